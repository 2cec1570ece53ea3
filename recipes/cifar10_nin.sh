#!/usr/bin/env bash
# Gidaris et al. (ICLR 2018), CIFAR-10 with the paper's NIN: Tables 1-3 in one command.
#   recipes/cifar10_nin.sh                  # the real thing: needs CIFAR-10 (--download) and a GPU
#   recipes/cifar10_nin.sh --smoke          # every step on the built-in digits, a few steps each
# Extra options go to `rotnet reproduce` (e.g. --device cuda:1 --out runs/paper --data-dir ~/datasets/cifar10,
# or --schedule official --out runs/paper-official for the released code's 200-epoch pretraining).
set -euo pipefail
if [[ " $* " == *" --smoke "* ]]; then
  exec rotnet reproduce paper-cifar10 "$@"
fi
exec rotnet reproduce paper-cifar10 --data cifar10 --download "$@"
