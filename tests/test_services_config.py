"""Several services in SWARM_CONFIG_FILE: the format, what each service gets, and every bad line
stopping the start with a message naming the file, the line and what is wrong (issue 12)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spoa.config import (
    ConfigError,
    HostPort,
    KeySource,
    Route,
    ServiceSpec,
    load_settings,
    service_settings,
    settings_env,
)
from spoa.haproxy import template
from spoa.haproxy.process import shipped_config

THREE = """\
# the shop on its own name, the API under a path, everything else to www
shop.example.com   tasks.shop:8080
example.com/api    tasks.api:80   key=header:X-User,src  check=/healthz
tasks.www:80       cookie=WWW
"""


def load(tmp_path: Path, text: str, **env: str) -> object:
    path = tmp_path / "my-config"
    path.write_text(text)
    return load_settings({}, {"SWARM_CONFIG_FILE": str(path), **env})


def test_the_seed_file_is_one_service_as_before(tmp_path: Path) -> None:
    s = load(tmp_path, "tasks.backend:80\n")
    assert s.services == ()  # type: ignore[attr-defined]
    (one,) = service_settings(s)  # type: ignore[arg-type]
    assert one is s
    assert one.haproxy_backend == "be_app" and one.sticky_cookie == "SWARMID"
    assert one.slot_map.endswith("/slots.map")
    assert "SWARM_SERVICE" in settings_env(one)


def test_three_services_each_with_their_own(tmp_path: Path) -> None:
    s = load(tmp_path, THREE, AGENT_LISTEN="127.0.0.1:12000", RUN_DIR="/run/x")
    shop, api, www = service_settings(s)  # type: ignore[arg-type]
    assert [one.service_name for one in (shop, api, www)] == ["shop", "api", "www"]
    assert shop.service == ServiceSpec("tasks.shop", 8080)
    assert [one.haproxy_backend for one in (shop, api, www)] == ["be_shop", "be_api", "be_www"]
    # AGENT_LISTEN answers the look-ups of patterns; the services take the ports after it
    assert [one.listen for one in (shop, api, www)] == [HostPort("127.0.0.1", 12001 + n) for n in range(3)]
    # STICKY_KEY's sticky cookie becomes each service's own cookie; a line's key= replaces the chain
    assert shop.sticky_cookie == "SWARMID_shop"
    assert shop.sticky_key == (KeySource("cookie", "SWARMID_shop"),)
    assert api.sticky_key == (KeySource("header", "X-User"), KeySource("src"))
    assert www.sticky_cookie == "WWW" and www.sticky_key[0] == KeySource("cookie", "WWW")
    assert api.check_path == "/healthz" and shop.check_path == ""
    assert api.cookie_attributes.startswith("; Path=/api;") and shop.cookie_attributes.startswith("; Path=/;")
    assert shop.slot_map == "/run/x/shop.slots.map" and api.cookie_map == "/run/x/api.cookies.map"
    assert {one.admin_socket for one in (shop, api, www)} == {"/run/x/admin.sock"}
    # the agent process reads the file itself: SWARM_SERVICE would make it a single service
    assert "SWARM_SERVICE" not in settings_env(s)  # type: ignore[arg-type]


@pytest.mark.parametrize(("route", "matches", "misses"), [
    ("shop.example.com", ["shop.example.com/", "shop.example.com/a/b"],
     ["shop.example.com.evil/", "xshop.example.com/"]),
    ("example.com/api", ["example.com/api", "example.com/api/", "example.com/api/v1"],
     ["example.com/apix", "example.com/"]),
    ("*.example.com", ["a.example.com/", "a.b.example.com/x"], ["example.com/", "a.example.com.evil/"]),
    ("/admin", ["any.host/admin", "/admin/x"], ["any.host/administrator"]),
])
def test_route_regex(route: str, matches: list[str], misses: list[str]) -> None:
    from spoa.config import parse_route

    regex = re.compile(parse_route(route).regex())
    for subject in matches:
        assert regex.search(subject), subject
    for subject in misses:
        assert not regex.search(subject), subject


def test_services_map_puts_specific_routes_first(tmp_path: Path) -> None:
    s = load(tmp_path, "tasks.www:80\n*.example.com tasks.any:80\nexample.com tasks.home:80\n"
                       "example.com/api/v2 tasks.v2:80\nexample.com/api tasks.api:80\n/health tasks.health:80\n")
    services = service_settings(s)  # type: ignore[arg-type]
    config = Path(shipped_config())
    rendered = template.render(config.read_text(), (config.parent / "spoe.conf").read_text(), s, services)  # type: ignore[arg-type]
    backends = [line.split()[1] for line in rendered.services_map.splitlines()]
    assert backends == ["be_v2", "be_api", "be_home", "be_any", "be_health", "be_www"]
    assert rendered.services_map.splitlines()[-1] == "^ be_www"


def test_rendered_backends_are_the_shipped_ones_with_the_services_values(tmp_path: Path) -> None:
    s = load(tmp_path, THREE, RUN_DIR=str(tmp_path))
    services = service_settings(s)  # type: ignore[arg-type]
    config = Path(shipped_config())
    rendered = template.render(config.read_text(), (config.parent / "spoe.conf").read_text(), s, services)  # type: ignore[arg-type]
    for name in ("shop", "api", "www"):
        assert f"\nbackend be_{name}\n" in rendered.config and f"\nbackend be_{name}_agent\n" in rendered.config
    assert "backend be_app\n" not in rendered.config
    api_spoe = rendered.spoe[str(tmp_path / "api.spoe.conf")]
    assert 'use-backend "be_api_agent"' in api_spoe and "args header=req.hdr(X-User)" not in api_spoe
    assert '.if !streq("X-User","X-Haproxy-Swarm-Unused")' in api_spoe
    # what the services do not set stays for HAProxy to expand from the environment
    assert '"${DNS_NAMESERVER}"' not in rendered.config  # only in the resolvers section, not copied
    assert "swarmdns" in rendered.config


@pytest.mark.parametrize(("text", "words"), [
    ("shop.example.com tasks.shop:80\nshop.example.com tasks.other:80\n",
     ["line 2", "route shop.example.com", "line 1"]),
    ("a.example.com tasks.shop:80\nb.example.com tasks.shop:81\n", ["line 2", "name shop", "name="]),
    ("tasks.a:80\ntasks.b:80\n", ["line 2", "default service"]),
    ("shop.example.com\n", ["invalid service", "NAME:PORT"]),
    ("shop.example.com key=src\n", ["line 1", "got 'key=src'"]),
    ("tasks.a:80\nshop.example.com\n", ["line 2", "no service follows"]),
    ("shop.example.com tasks.shop\n", ["line 1", "NAME:PORT"]),
    ("bad_host! tasks.shop:80\n", ["line 1", "host name"]),
    ("shop.example.com tasks.shop:80 sticky=src\n", ["line 1", "unknown option 'sticky=src'"]),
    ("shop.example.com tasks.shop:80 key=ip\n", ["line 1", "key=ip", "unknown key kind"]),
    ("shop.example.com tasks.shop:80 check=health\n", ["line 1", "check=health"]),
    ("shop.example.com tasks.shop:80 name=Shop!\n", ["line 1", "name='Shop!'"]),
    ("a.example.com tasks.a:80 cookie=C\nb.example.com tasks.b:80 cookie=C\n", ["services a and b", "'C'"]),
    ("shop.example.com tasks.shop:80 key=header:X-User,header:X-Other\n", ["line 1", "service shop", "STICKY_KEY"]),
    ("# nothing\n\n", ["names no service"]),
])
def test_a_bad_file_names_the_line_and_what_is_wrong(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    message = str(e.value)
    assert "SWARM_CONFIG_FILE" in message and str(tmp_path / "my-config") in message
    for word in words:
        assert word in message, message


def test_services_ports_stay_clear_of_the_metrics_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="METRICS_LISTEN"):
        load(tmp_path, THREE, AGENT_LISTEN="127.0.0.1:9100", METRICS_LISTEN="127.0.0.1:9101")


def test_route_rank_is_most_specific_first() -> None:
    routes = [Route("", "/a"), Route("*.x.com", ""), Route("x.com", ""), Route("x.com", "/a/b"), Route("x.com", "/a")]
    assert sorted(routes, key=lambda r: r.rank) == [Route("x.com", "/a/b"), Route("x.com", "/a"), Route("x.com", ""),
                                                    Route("*.x.com", ""), Route("", "/a")]


def test_one_service_on_two_lines_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2: the service tasks.shop:80 is already line 1's"):
        load(tmp_path, "shop.example.com tasks.shop:80\nwww.shop.example.com tasks.shop:80 name=shop2\n")


def test_a_pattern_line_has_slots_after_the_services_ports(tmp_path: Path) -> None:
    from spoa.config import ondemand_listen, pattern_backends

    s = load(tmp_path, "shop.example.com tasks.shop:80\n*.apps.example.com tasks.{1}:8080 max=3 check=/hc\n",
             AGENT_LISTEN="127.0.0.1:12000")
    assert [one.service_name for one in service_settings(s)] == ["shop"]  # type: ignore[arg-type]
    ((line, slots),) = pattern_backends(s)  # type: ignore[arg-type]
    assert line.name == "apps" and line.on_demand == 3
    assert line.service_for("blog") == ServiceSpec("tasks.blog", 8080)
    assert [one.haproxy_backend for one in slots] == ["be_apps_1", "be_apps_2", "be_apps_3"]
    assert [one.listen.port for one in slots] == [12002, 12003, 12004]
    assert {one.sticky_cookie for one in slots} == {"SWARMID_apps"}  # one cookie: each Host is its own
    assert {one.check_path for one in slots} == {"/hc"}
    assert ondemand_listen(s) == HostPort("127.0.0.1", 12000)  # type: ignore[arg-type]  # fixed across reloads


@pytest.mark.parametrize(("text", "words"), [
    ("apps.example.com tasks.{1}:80\n", ["line 1", "needs a route such as *.apps.example.com"]),
    ("*.apps.example.com/x tasks.{1}:80\n", ["line 1", "no path"]),
    ("*.a.example.com tasks.{1}-{1}:80\n", ["line 1", "may appear once"]),
    ("shop.example.com tasks.shop:80 max=3\n", ["line 1", "max= is for a pattern"]),
    ("*.a.example.com tasks.{1}:80 max=0\n", ["line 1", "max=0"]),
    ("*.a.example.com tasks.{1}:80 max=65\n", ["line 1", "max=65"]),
])
def test_a_bad_pattern_line_names_what_is_wrong(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    for word in words:
        assert word in str(e.value), str(e.value)


def test_haproxy_accepts_every_services_backends_from_any_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` started elsewhere than beside haproxy.cfg (the image's WORKDIR): parsing fe_main's SPOE
    file leaves HAProxy's current directory where it started, so every SPOE path must be absolute."""
    from spoa.supervisor import Supervisor

    s = load(tmp_path, THREE + "*.apps.example.com tasks.{1}:80 max=2\n", RUN_DIR=str(tmp_path / "run"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    Supervisor(s).haproxy.check()  # type: ignore[arg-type]  # raises HAProxyError with HAProxy's alerts


def test_a_comment_added_is_no_change_of_the_services(tmp_path: Path) -> None:
    """`run` compares the services read again with the running ones: line numbers do not count."""
    before = load(tmp_path, THREE)
    after = load(tmp_path, "# a comment on top\n\n" + THREE)
    assert after.services == before.services  # type: ignore[attr-defined]


@pytest.mark.parametrize("route", ["example.com/caf%C3%A9", "example.com/$HOME"])
def test_route_paths_refuse_haproxys_format_and_expansion_characters(tmp_path: Path, route: str) -> None:
    with pytest.raises(ConfigError, match="invalid path"):
        load(tmp_path, f"{route} tasks.api:80\ntasks.www:80\n")
