from leafguard.cli import main

raise SystemExit(main())
