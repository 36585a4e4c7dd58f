from dsdm.cli import main

raise SystemExit(main())
