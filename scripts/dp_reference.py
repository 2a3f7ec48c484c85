#!/usr/bin/env python3
"""Reference values for Mekong's RDP accountant (fedcore/src/privacy/rdp.rs, issue #20).

Computes, for standard DP-SGD settings, the RDP of the Poisson-subsampled Gaussian at
Opacus's default orders and the resulting (epsilon, best order) at delta, with both Opacus
(opacus.accountants.analysis.rdp) and Google's dp_accounting (rdp.RdpAccountant), and writes
them to fedcore/tests/fixtures/dp_accountant.json, which fedcore/tests/dp_accountant.rs
checks the Rust port against (within 1%).

    python -m pip install opacus dp-accounting
    python scripts/dp_reference.py
"""
import json
import pathlib

import dp_accounting
import mpmath as mp
import opacus
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

ORDERS = RDPAccountant.DEFAULT_ALPHAS

# (name, sampling rate q, noise multiplier sigma, steps, delta)
SETTINGS = [
    ("abadi-mnist", 256 / 60000, 1.1, 60 * 234, 1e-5),
    ("q0.01-s1.0-1000", 0.01, 1.0, 1000, 1e-5),
    ("q0.001-s0.8-10000", 0.001, 0.8, 10000, 1e-6),
    ("q0.1-s2.0-100", 0.1, 2.0, 100, 1e-5),
    ("q0.05-s0.6-500", 0.05, 0.6, 500, 1e-5),
    ("full-batch-s5-10", 1.0, 5.0, 10, 1e-5),
    ("pilot-lab-q0.04-s1.0-12", 0.04, 1.0, 12, 1e-5),
    ("q0.02-s4.0-5000", 0.02, 4.0, 5000, 1e-8),
]


# Orders at which one step's RDP is also computed exactly, by numerical integration of the
# Renyi divergence between the subsampled mixture and N(0, sigma^2) (50 digits): the check
# that settles which library is right where they disagree.
EXACT_ORDERS = [1.5, 1.8, 2.5, 8.0]


def exact_rdp(q, sigma, alpha):
    if q == 1.0:
        return alpha / (2 * sigma**2)
    mp.mp.dps = 50

    def integrand(z):
        mix = (1 - q) * mp.npdf(z, 0, sigma) + q * mp.npdf(z, 1, sigma)
        return mix**alpha * mp.npdf(z, 0, sigma) ** (1 - alpha)

    a = mp.quad(integrand, [-mp.inf, -10 * sigma, 0, 1, 1 + 10 * sigma, mp.inf])
    return float(mp.log(a) / (alpha - 1))


def google_epsilon(q, sigma, steps, delta):
    acc = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


cases = []
for name, q, sigma, steps, delta in SETTINGS:
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    eps, order = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    g_eps, g_order = google_epsilon(q, sigma, steps, delta)
    cases.append(
        {
            "name": name,
            "q": q,
            "noise_multiplier": sigma,
            "steps": steps,
            "delta": delta,
            "rdp": [float(r) for r in rdp],
            "opacus_epsilon": float(eps),
            "opacus_order": float(order),
            "dp_accounting_epsilon": g_eps,
            "dp_accounting_order": g_order,
            "exact_one_step_rdp": {str(a): exact_rdp(q, sigma, a) for a in EXACT_ORDERS},
        }
    )
    print(f"{name}: opacus eps {eps:.4f} (order {order}), dp_accounting eps {g_eps:.4f} (order {g_order})")

out = pathlib.Path(__file__).resolve().parent.parent / "fedcore/tests/fixtures/dp_accountant.json"
out.write_text(
    json.dumps(
        {
            "generated_by": "scripts/dp_reference.py",
            "opacus": opacus.__version__,
            "dp_accounting": getattr(dp_accounting, "__version__", "unknown"),
            "orders": [float(a) for a in ORDERS],
            "cases": cases,
        },
        indent=1,
    )
    + "\n"
)
print(f"wrote {out}")
