from qpeft.core.cli.main import main

main()
