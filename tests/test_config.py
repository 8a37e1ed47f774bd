"""Settings: flags > env > defaults; every bad value stops the start with a message naming the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from spoa.app import startup_warnings
from spoa.config import (
    OPTIONS,
    ConfigError,
    HostPort,
    KeySource,
    ServiceSpec,
    load_settings,
    parse_host_port,
    settings_env,
)

ROOT = Path(__file__).resolve().parents[1]


def test_seed_config_file_names_the_service(tmp_path: Path) -> None:
    seed = tmp_path / "my-config"
    seed.write_text("tasks.backend:80\n")
    s = load_settings({}, {"SWARM_CONFIG_FILE": str(seed)})
    assert s.service == ServiceSpec("tasks.backend", 80)
    assert s.sticky_key == (KeySource("cookie", "SWARMID"),)  # nothing that depends on the client's address
    assert s.refresh == 2.0
    assert s.listen == HostPort("127.0.0.1", 12345)
    assert s.issues_cookie


def test_flag_beats_env_beats_default() -> None:
    s = load_settings({"refresh": "5"}, {"SWARM_SERVICE": "tasks.a:81", "DNS_REFRESH": "3"})
    assert s.refresh == 5.0
    assert load_settings({}, {"SWARM_SERVICE": "tasks.a:81", "DNS_REFRESH": "3"}).refresh == 3.0


def test_srv_service() -> None:
    s = load_settings({}, {"SWARM_SERVICE": "_http._tcp.backend"})
    assert s.service == ServiceSpec("_http._tcp.backend", 0, srv=True)
    assert s.haproxy_env()["SWARM_DNS_TARGET"] == "_http._tcp.backend"


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"SWARM_SERVICE": "tasks.backend"}, "SWARM_SERVICE"),
        ({"SWARM_SERVICE": "tasks.backend:99999"}, "SWARM_SERVICE"),
        ({"SWARM_SERVICE": "bad name:80"}, "SWARM_SERVICE"),
        ({"DNS_REFRESH": "often"}, "DNS_REFRESH"),
        ({"DNS_REFRESH": "-1"}, "DNS_REFRESH"),
        ({"STICKY_KEY": "cookie:"}, "STICKY_KEY"),
        ({"STICKY_KEY": "ip"}, "STICKY_KEY"),
        ({"STICKY_KEY": "src,src"}, "STICKY_KEY"),
        ({"STICKY_KEY": "header:A,header:B"}, "STICKY_KEY"),
        ({"AGENT_LISTEN": "127.0.0.1"}, "AGENT_LISTEN"),
        ({"AGENT_LISTEN": "127.0.0.1:0"}, "AGENT_LISTEN"),
        ({"DNS_NAMESERVER": "[::1"}, "DNS_NAMESERVER"),
        ({"DNS_NAMESERVER": "dns.example:53"}, "DNS_NAMESERVER"),
        ({"RUN_DIR": "relative/dir"}, "RUN_DIR"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS"),
        ({"COOKIE_MAX_AGE": "soon"}, "COOKIE_MAX_AGE"),
        ({"TRUSTED_PROXIES": "10.0.0.1/8"}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "10.0.0.0/8,proxy.example"}, "TRUSTED_PROXIES"),
        ({"CLIENT_ADDRESS_FROM": "x-real-ip"}, "CLIENT_ADDRESS_FROM"),
        ({"CLIENT_ADDRESS_FROM": ""}, "CLIENT_ADDRESS_FROM"),
        ({"BALANCE": "roundrobin"}, "BALANCE"),
        ({"BALANCE": "random(0)"}, "BALANCE"),
        ({"TUNNEL_TIMEOUT": "1h"}, "TUNNEL_TIMEOUT"),
        ({"TUNNEL_TIMEOUT": "0"}, "TUNNEL_TIMEOUT"),
        ({"HTTP_TIMEOUT": "-5"}, "HTTP_TIMEOUT"),
        ({"HARD_STOP_AFTER": "never"}, "HARD_STOP_AFTER"),
    ],
)
def test_bad_value_names_the_setting(env: dict[str, str], setting: str) -> None:
    env = {"SWARM_SERVICE": "tasks.backend:80"} | env
    with pytest.raises(ConfigError) as err:
        load_settings({}, env)
    assert setting in str(err.value)
    assert repr(env[setting]) in str(err.value)


def test_timeouts_reach_haproxy_in_milliseconds() -> None:
    env = load_settings({}, {"SWARM_SERVICE": "tasks.x:80"}).haproxy_env()
    assert (env["HAPROXY_HTTP_TIMEOUT"], env["HAPROXY_TUNNEL_TIMEOUT"], env["HAPROXY_HARD_STOP_AFTER"]) == (
        "30000ms", "3600000ms", "60000ms")
    env = load_settings({"tunnel_timeout": "90.5"}, {"SWARM_SERVICE": "tasks.x:80", "HTTP_TIMEOUT": "5"}).haproxy_env()
    assert (env["HAPROXY_HTTP_TIMEOUT"], env["HAPROXY_TUNNEL_TIMEOUT"]) == ("5000ms", "90500ms")


def test_missing_seed_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"SWARM_CONFIG_FILE \(.*\) cannot be read"):
        load_settings({}, {"SWARM_CONFIG_FILE": str(tmp_path / "nope")})


def test_host_port_forms() -> None:
    assert parse_host_port("[::1]:53") == HostPort("::1", 53)
    assert parse_host_port("::1", 53) == HostPort("::1", 53)
    assert parse_host_port("*:8099") == HostPort("0.0.0.0", 8099)
    assert str(HostPort("::1", 53)) == "[::1]:53"


def test_settings_survive_the_trip_through_the_environment() -> None:
    s = load_settings({"sticky_key": "header:X-User,param:uid,src", "cookie_secret": "s3"},
                      {"SWARM_SERVICE": "tasks.x:8080", "DNS_NAMESERVER": "[::1]:5353"})
    assert load_settings({}, settings_env(s)) == s


def test_haproxy_env_points_the_spoe_slots_at_the_chain() -> None:
    s = load_settings({"sticky_key": "cookie:SESSION,header:X-User,param:uid,src"},
                      {"SWARM_SERVICE": "tasks.x:8080"})
    env = s.haproxy_env()
    assert (env["KEY_COOKIE"], env["KEY_HEADER"], env["KEY_PARAM"]) == ("SESSION", "X-User", "uid")
    assert env["STICKY_COOKIE"] == "SWARMID"
    assert not s.issues_cookie


def test_every_setting_is_documented_and_every_haproxy_variable_has_a_default() -> None:
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    for opt in OPTIONS:
        assert f"`{opt.env}`" in guide and f"`{opt.flag}`" in guide, opt.env
    cfg = (ROOT / "haproxy.cfg").read_text() + (ROOT / "spoe.conf").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", cfg))
    preset = set(re.findall(r"^\s*presetenv\s+([A-Z0-9_]+)", cfg, re.M))
    optional = {"CHECK_PATH", "TLS_CERT", "HAPROXY_MAXCONN", "HAPROXY_NBTHREAD",  # guarded by `.if` in haproxy.cfg
                "ACME_CRT_LIST", "ACME_THUMBPRINT"}
    assert used - preset - optional == set()
    s = load_settings({}, {"SWARM_SERVICE": "tasks.x:8080"})
    assert set(s.haproxy_env()) <= preset | optional


def test_weak_settings_are_warned_about_at_start() -> None:
    def warnings(**env: str) -> list[str]:
        return startup_warnings(load_settings({}, {"SWARM_SERVICE": "tasks.a:80"} | env))

    assert warnings(COOKIE_SECRET="s3cret") == []
    assert warnings(COOKIE_SECRET="s3cret", STICKY_KEY="src") == []  # no cookie, no secret needed
    assert ["COOKIE_SECRET is not set" in w for w in warnings()] == [True]
    assert ["'change-me'" in w for w in warnings(COOKIE_SECRET="change-me")] == [True]
    (exposed,) = warnings(COOKIE_SECRET="s3cret", AGENT_LISTEN="0.0.0.0:12345")
    assert exposed.startswith("AGENT_LISTEN 0.0.0.0:12345 is not a loopback address")


def test_trusted_proxies_reach_haproxy_as_a_list_file_and_flags() -> None:
    s = load_settings({}, {"SWARM_SERVICE": "tasks.backend:80", "TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7 fd00::/8",
                           "CLIENT_ADDRESS_FROM": "proxy-protocol"})
    assert s.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32", "fd00::/8")
    env = s.haproxy_env()
    assert env["TRUSTED_PROXIES_FILE"] == s.trusted_proxies_file
    assert (env["PROXY_PROTOCOL"], env["FORWARDED_FOR"]) == ("1", "0")
    nobody = load_settings({}, {"SWARM_SERVICE": "tasks.backend:80"}).haproxy_env()
    assert "TRUSTED_PROXIES_FILE" not in nobody  # the shipped empty list
    assert (nobody["PROXY_PROTOCOL"], nobody["FORWARDED_FOR"]) == ("0", "0")
