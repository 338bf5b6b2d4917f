from keystore.cli import main

raise SystemExit(main())
