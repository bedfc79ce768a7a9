from anim.cli import main

raise SystemExit(main())
