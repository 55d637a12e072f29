from crv.cli import main

main()
