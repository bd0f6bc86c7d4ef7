"""Alignment methods, one file each. Importing this package registers every built-in method.

    sqdf.py          SQDF (Kang, Lee, Shin, Om, Park; ICLR 2026, arXiv:2512.04559)
    sqdf_online.py   SQDF in the online black-box setting (same paper, its BBO experiments)
    draft.py         DRaFT-K / -LV / +KL (Clark, Vicol, Swersky, Fleet; ICLR 2024, arXiv:2309.17400)
    refl.py          ReFL (Xu et al.; NeurIPS 2023, arXiv:2304.05977)
    alignprop.py     AlignProp (Prabhudesai, Goyal, Pathak, Fragkiadaki; 2023, arXiv:2310.03739)
    ddpo.py          DDPO, DDPO+KL (Black, Janner, Du, Kostrikov, Levine; ICLR 2024, arXiv:2305.13301)
    dpok.py          PPO+KL / DPOK (Fan et al.; NeurIPS 2023, arXiv:2305.16381)
    seiko.py         SEIKO (Uehara et al.; ICML 2024, arXiv:2402.16359)

Shared pieces (no registration): common.py (prompts, optimizer, config checks), policy_gradient.py
(DDPO/DPOK advantages, surrogates, log-prob recomputation), proxy.py (SEIKO's oracle rounds and
optimistic proxy). Derivations: docs/methods/.

To add a method: write `methods/<name>.py` (see bench/core/method.py and docs/adding_a_method.md)
and import it here.
"""

from methods import draft, sqdf  # noqa: F401
from methods import ddpo  # noqa: F401
from methods import dpok  # noqa: F401
from methods import refl  # noqa: F401
from methods import alignprop  # noqa: F401
from methods import seiko  # noqa: F401
from methods import sqdf_online  # noqa: F401
