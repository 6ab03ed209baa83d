"""`python -m train_engine_8b ...` (or under torchrun: `torchrun ... -m train_engine_8b ...`)."""

from train_engine_8b.cli import app

if __name__ == "__main__":
    app(prog_name="train_engine_8b")
