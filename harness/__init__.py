"""forge's control plane: the CLI behind agent-loop.sh, forge specs, the loop, agent backends, ledger."""
