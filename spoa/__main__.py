from spoa.cli import main

raise SystemExit(main())
