from gemmaq.cli import main

main()
