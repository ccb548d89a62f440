from ghsae.cli import main

main()
