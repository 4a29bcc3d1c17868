"""advkit: a study kit for "Intriguing properties of adversarial training at scale" (Xie and Yuille, ICLR 2020)."""

__version__ = "0.1.0"
