"""The catalog: prices, runtimes, phase defaults and exchange rates, each row with its source.

Data lives in CSV files next to this module so a user can read and edit them:

- `prices.csv`   provider, gpu, price_per_hour, currency, billing granularity, storage price
- `runtimes.csv` gpu, training steps/s, evaluation megapixels/s
- `phases.csv`   per provider kind: boot, setup, teardown, pull seconds (and staging/videos
                 for every provider, `*`); all assumptions until history replaces them
- `fx.csv`       USD per unit of a currency, used only when a caller asks to convert

GPU names are normalised (`canonical_gpu("4090") == "RTX 4090"`). Loading is cached.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, nearest

CATALOG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class PriceRow:
    provider: str
    gpu: str
    price_per_hour: float
    currency: str
    billing_granularity_s: float
    storage_price_per_gb_month: float
    offer: str
    source: str
    date: str
    billing_source: str


@dataclass(frozen=True, slots=True)
class RuntimeRow:
    gpu: str
    steps_per_second: float
    eval_megapixels_per_second: float
    source: str
    eval_source: str


@dataclass(frozen=True, slots=True)
class PhaseDefault:
    provider: str          # a provider kind, or "*" for every provider
    phase: str
    seconds: float
    source: str


@dataclass(frozen=True, slots=True)
class FxRate:
    currency: str
    usd_per_unit: float
    source: str
    date: str


# Spellings people use -> the catalog's name. Keys are compared after `_key()`.
_ALIASES: dict[str, str] = {
    "h100": "H100 SXM", "h100sxm": "H100 SXM", "h100sxm5": "H100 SXM", "h10080gb": "H100 SXM",
    "h100pcie": "H100 PCIe",
    "a100": "A100 80GB", "a10080gb": "A100 80GB", "a10080g": "A100 80GB",
    "a10080gbpcie": "A100 80GB PCIe", "a100pcie": "A100 80GB PCIe",
    "a10080gbsxm": "A100 80GB SXM", "a100sxm": "A100 80GB SXM", "a100sxm4": "A100 80GB SXM",
    "4090": "RTX 4090", "rtx4090": "RTX 4090", "geforcertx4090": "RTX 4090",
    "3090": "RTX 3090", "rtx3090": "RTX 3090", "geforcertx3090": "RTX 3090",
    "l40s": "L40S", "v100": "V100", "teslav100": "V100", "v10016gb": "V100", "v10032gb": "V100",
    "cpu": "cpu", "none": "cpu",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", ""))


def _read(name: str) -> list[dict[str, str]]:
    path = CATALOG_DIR / name
    try:
        with path.open(newline="") as fh:
            return [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    except OSError as exc:
        raise ConfigError(f"catalog file {path} cannot be read: {exc.strerror or exc}",
                          hint="reinstall orchestrate; the catalog ships with it") from None


def _num(row: dict[str, str], key: str, file: str) -> float:
    try:
        return float(row[key])
    except (KeyError, ValueError):
        raise ConfigError(f"catalog {file}: bad {key} {row.get(key)!r} in row {row}",
                          hint=f"fix orchestrator/catalog/{file}") from None


@lru_cache(maxsize=1)
def prices() -> tuple[PriceRow, ...]:
    f = "prices.csv"
    return tuple(PriceRow(r["provider"], r["gpu"], _num(r, "price_per_hour", f), r["currency"].upper(),
                          _num(r, "billing_granularity_s", f), _num(r, "storage_price_per_gb_month", f),
                          r["offer"], r["source"], r["date"], r["billing_source"])
                 for r in _read(f))


@lru_cache(maxsize=1)
def runtimes() -> dict[str, RuntimeRow]:
    f = "runtimes.csv"
    return {r["gpu"]: RuntimeRow(r["gpu"], _num(r, "steps_per_second", f),
                                 _num(r, "eval_megapixels_per_second", f), r["source"], r["eval_source"])
            for r in _read(f)}


@lru_cache(maxsize=1)
def phase_defaults() -> tuple[PhaseDefault, ...]:
    f = "phases.csv"
    return tuple(PhaseDefault(r["provider"], r["phase"], _num(r, "seconds", f), r["source"])
                 for r in _read(f))


@lru_cache(maxsize=1)
def fx_rates() -> dict[str, FxRate]:
    f = "fx.csv"
    return {r["currency"].upper(): FxRate(r["currency"].upper(), _num(r, "usd_per_unit", f),
                                          r["source"], r["date"]) for r in _read(f)}


@lru_cache(maxsize=1)
def gpu_names() -> tuple[str, ...]:
    """Every GPU the catalog knows (prices or runtimes), sorted."""
    return tuple(sorted({p.gpu for p in prices()} | set(runtimes())))


def canonical_gpu(name: str) -> str | None:
    """The catalog's name for `name` ("4090" -> "RTX 4090"), or None when unknown."""
    k = _key(name)
    if not k:
        return None
    for known in gpu_names():
        if _key(known) == k:
            return known
    return _ALIASES.get(k)


def suggest_gpu(name: str) -> str | None:
    """The nearest known GPU name for a did-you-mean, or None."""
    names = list(gpu_names())
    by_key = {_key(n): n for n in names}
    by_key.update({k: v for k, v in _ALIASES.items() if v in names})
    close = nearest(_key(name), list(by_key))
    return by_key[close] if close else nearest(name, names)


def price_rows(provider: str, gpu: str) -> list[PriceRow]:
    """Catalog prices for `gpu` at `provider`, cheapest first."""
    return sorted((p for p in prices() if p.provider == provider and p.gpu == gpu),
                  key=lambda p: p.price_per_hour)


def cheapest_price(provider: str, gpu: str) -> PriceRow | None:
    rows = price_rows(provider, gpu)
    return rows[0] if rows else None


def phase_default(provider: str, phase: str) -> PhaseDefault | None:
    """The default seconds for `phase` on `provider` (a provider-specific row wins over `*`)."""
    rows = phase_defaults()
    for want in (provider, "*"):
        for r in rows:
            if r.provider == want and r.phase == phase:
                return r
    return None


def convert(amount: float, from_currency: str, to_currency: str) -> tuple[float, str]:
    """`amount` in `to_currency` and the rate's source; ConfigError when a rate is missing."""
    a, b = from_currency.upper(), to_currency.upper()
    if a == b:
        return amount, "same currency"
    rates = fx_rates()
    missing = [c for c in (a, b) if c not in rates]
    if missing:
        raise ConfigError(f"no exchange rate for {', '.join(missing)} in the catalog",
                          hint=f"add a row to {CATALOG_DIR / 'fx.csv'} or use one currency")
    value = amount * rates[a].usd_per_unit / rates[b].usd_per_unit
    why = "; ".join(f"{c}: {rates[c].source}" for c in (a, b) if c != "USD")
    src = f"fx.csv: 1 {a} = {rates[a].usd_per_unit / rates[b].usd_per_unit:.4g} {b} ({why})"
    return value, src


def format_money(amount: float | None) -> str:
    """An amount as every command, table and message shows it: 2 decimals from 1 up, 3
    significant digits below (hourly GPU prices times seconds are often fractions of a cent)."""
    if amount is None or amount != amount:
        return "-"
    if amount == 0 or abs(amount) >= 1:
        return f"{amount:,.2f}" if abs(amount) >= 10_000 else f"{amount:.2f}"
    return f"{amount:.{max(2, 2 - math.floor(math.log10(abs(amount))))}f}"
