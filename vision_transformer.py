"""DINO's ``vision_transformer`` names (``vits.vit_small``, ``vits.DINOHead``, ``vits.__dict__[arch]``, ...) for
code written against DINO's repository; the implementation is ``simpool.vision_transformer``."""

from simpool.vision_transformer import *  # noqa: F401,F403
