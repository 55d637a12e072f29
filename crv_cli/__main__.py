from crv_cli.main import main

main()
