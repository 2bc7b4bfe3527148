from ft_course.cli import main
raise SystemExit(main())
