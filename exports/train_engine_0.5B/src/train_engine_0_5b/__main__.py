"""`python -m train_engine_0_5b ...` (or under torchrun: `torchrun ... -m train_engine_0_5b ...`)."""

from train_engine_0_5b.cli import app

if __name__ == "__main__":
    app(prog_name="train_engine_0_5b")
