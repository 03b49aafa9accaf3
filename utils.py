"""DINO's ``utils`` names (``utils.cosine_scheduler``, ``utils.bool_flag``, ``utils.MetricLogger``, ...) for
code written against DINO's repository; the implementation is ``simpool.utils``."""

from simpool.utils import *  # noqa: F401,F403
