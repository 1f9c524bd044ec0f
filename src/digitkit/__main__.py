from digitkit.cli import main

raise SystemExit(main())
