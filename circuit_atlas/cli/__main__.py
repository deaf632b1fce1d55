from circuit_atlas.cli import main

main()
