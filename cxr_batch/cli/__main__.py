from cxr_batch.cli.main import main

main()
