from megarnn.cli import main

raise SystemExit(main())
