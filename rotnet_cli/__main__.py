"""python -m rotnet_cli (also what torchrun runs: torchrun ... -m rotnet_cli pretrain ...)."""

from rotnet_cli.cli import main

if __name__ == "__main__":
    main()
