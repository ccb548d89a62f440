"""`ghsae rate`: the Group-SAE paper's human interpretability study as a kit anyone can run.

    ghsae rate RUN [--baseline BASE] --latents 96   -> one HTML page + RUN/report/rating-key-<kit>.json
    ghsae rate RUN --score ratings.csv              -> per SAE and layer: share rated interpretable

For every SAE and every layer it serves (a group SAE is rated at each of its layers, as the paper
rates 96 latents per layer), `latents` latents are drawn at random among those that fire on the
run's held-out tokens at that layer (a latent that never fires has no dashboard to judge). The
group SAEs' and the baseline's items are shuffled together under opaque ids; the page shows each
with its dashboard (top contexts, activation histogram, promoted and suppressed tokens) and no
name, kind or layer. The key from ids to (SAE, layer, latent) is written to the run folder only,
one key per page under the page's kit id (which the page and its CSV carry), so a second page never
replaces the key of the first; `--score` picks the key by the CSV's kit. Runs rated before that
hold one rating-key.json, still read.

The score is interpretable / (interpretable + not); "unsure" is counted and shown but left out of
the proportion. The interval is Wilson's 95% score interval for a binomial proportion, which stays
inside [0, 1] and behaves at the small counts a rating session gives.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import math
import re
from pathlib import Path

import numpy as np

from ghsae.analysis.rate_page import RATINGS, render
from ghsae.atomic import write_text_atomic
from ghsae.errors import ConfigError, GhsaeError
from ghsae.layout import RATING_KEY, RATING_KEY_PREFIX, RATING_PAGE, RATING_SCORES, RunLayout
from ghsae.records import RatingItem, RatingKey, RatingScores, Score, load_record, save_record

log = logging.getLogger(__name__)
COLUMNS = ("kit", "item", "rating", "rated_at")  # the page's download, in this order
_KIT_ID = re.compile(r"[0-9a-f]{1,64}")  # a kit id names a key file: nothing else may reach the path


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (nan, nan when n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class RatingError(GhsaeError):
    """A ratings file that does not belong to this run's kit, or cannot be read."""


# --- building the kit --------------------------------------------------------------------------


def build_kit(cfg, run, lm, baseline=None, n_latents: int = 96, out: Path | None = None) -> tuple[Path, RatingKey]:
    """The blind rating page of `run`'s SAEs (a ghsae.run.Run), mixed with `baseline`'s when given,
    using the loaded model `lm`; the key goes to RUN/report/rating-key-<kit>.json."""
    from ghsae.analysis.baseline import check_baseline_data
    from ghsae.analysis.dashboards import collect, contexts_html, histogram_svg, tokens_html
    from ghsae.analysis.report import SAEKind, load_side, token_strings

    if n_latents < 1:
        raise ConfigError(f"--latents is {n_latents}; expected a positive number of latents per SAE and layer")
    run_dir = run.root
    side = load_side(run, SAEKind.GROUP, allow_partial=True)
    base = None
    if baseline is not None:
        # the same model, data and eval split as the report asks; unequal tokens per SAE do not
        # stop a blind rating (the scores table names each SAE, so the reader sees the budgets)
        check_baseline_data(run, baseline)
        base = load_side(baseline, SAEKind.BASELINE, allow_partial=True)
    baseline_dir = baseline.root if baseline is not None else None
    contexts = run.eval_contexts()
    from ghsae.analysis.report import REPORT_MODEL_FIX

    lm.check_matches(run.plan.model, fix=REPORT_MODEL_FIX)
    seed = cfg.fit.seed
    rng = np.random.default_rng([seed, 14])
    targets = side.targets + (base.targets if base else [])
    # twice as many candidates as asked: those that never fire on the eval tokens are dropped
    wanted = {
        t.name: (
            t.sae,
            {
                layer: rng.choice(t.sae.cfg.n_latents, min(2 * n_latents, t.sae.cfg.n_latents), replace=False).tolist()
                for layer in t.sae.cfg.layers
            },
        )
        for t in targets
    }
    special = list(run.plan.tokenizer.special_ids)
    views = collect(
        lm, contexts, special, wanted, cfg.report.examples_per_latent, cfg.report.batch_contexts, run.plan.hookpoint
    )
    text = token_strings(lm, contexts)
    kinds = {t.name: t.kind for t in targets}
    entries = []
    for (name, layer), vs in views.items():
        for v in [v for v in vs if v.fired][:n_latents]:
            body = (
                contexts_html(v, contexts, text, cfg.report.window) + histogram_svg(v) + tokens_html(v, show_layer=False)
            )
            entries.append((name, kinds[name], layer, v.latent, body))
    order = rng.permutation(len(entries))
    items, bodies = [], []
    for i, j in enumerate(order):
        name, kind, layer, latent, body = entries[j]
        items.append(RatingItem(f"{i + 1:05d}", name, kind, layer, latent))
        bodies.append((f"{i + 1:05d}", body))
    base_path = str(Path(baseline_dir).resolve()) if baseline_dir is not None else None
    # the page's id: its items, run and baseline (the browser keeps ratings per kit, the key is found by it)
    kit_source = json.dumps([[x.to_json() for x in items], str(run_dir), base_path]).encode()
    kit = hashlib.sha256(kit_source).hexdigest()[:12]
    key = RatingKey(kit, str(Path(run_dir).resolve()), base_path, seed, tuple(items))
    intro = (
        f"{len(items)} latents, shuffled, from SAEs this page does not name. For each: would you call it "
        "<b>interpretable</b> (one concept explains most of the contexts where it fires), <b>not</b>, or "
        "<b>unsure</b>? Keys 1 / 2 / 3 rate, arrows move. Ratings stay in this browser until you download them; "
        f"then run <code>ghsae rate {html.escape(str(run_dir))} --score ratings-{kit}.csv</code>."
    )
    out = Path(out) if out else run.layout.report_file(RATING_PAGE)
    out.parent.mkdir(parents=True, exist_ok=True)
    run.layout.report.mkdir(exist_ok=True)
    save_record(run.layout.rating_key(kit), key)
    write_text_atomic(out, render(kit, bodies, intro))
    return out, key


# --- scoring ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The CSV's rows with their row numbers as a spreadsheet shows them (the header is row 1).
    UTF-8, with or without the byte-order mark spreadsheets write; at least one rating."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise RatingError(f"cannot read the ratings file {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise RatingError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); expected the CSV the "
            "rating page downloads: score that file, or save it again as 'CSV UTF-8' from the spreadsheet"
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise RatingError(f"{path} is not a readable CSV ({e}); expected the CSV the rating page downloads") from None
    if not rows:
        raise RatingError(
            f"{path} holds no ratings ({'empty' if not text.strip() else 'a header line only'}); rate items on the "
            "page, press 'download ratings (CSV)' and score that file. Earlier scores are left as they were"
        )
    if not set(COLUMNS[:3]) <= set(reader.fieldnames or ()):
        raise RatingError(f"{path} has columns {reader.fieldnames}; expected {','.join(COLUMNS)} (the page's download)")
    return rows


def kit_of(path: Path, rows: list[tuple[int, dict[str, str]]]) -> str:
    """The one rating kit (page) the CSV's rows are from."""
    kits: dict[str, int] = {}
    for n, row in rows:
        kits.setdefault(row["kit"], n)
    if len(kits) > 1:
        where = ", ".join(f"{k!r} from row {n}" for k, n in kits.items())
        raise RatingError(f"{path} mixes rows of {len(kits)} rating pages ({where}); score each page's CSV on its own")
    kit = next(iter(kits))
    if not isinstance(kit, str) or not _KIT_ID.fullmatch(kit):
        raise RatingError(f"{path} row {rows[0][0]}: kit {kit!r} is not a rating kit id; expected the page's download")
    return kit


def find_key(layout: RunLayout, kit: str, path: Path) -> RatingKey:
    """The key of the page with this kit id: its own file, or the single key of a run rated before
    pages had their own."""
    fix = f"write a new rating page with `ghsae rate {layout.root}`"
    if layout.rating_key(kit).is_file():
        return load_record(RatingKey, layout.rating_key(kit), fix=fix)
    legacy = layout.report_file(RATING_KEY)
    if legacy.is_file():
        key = load_record(RatingKey, legacy, fix=fix)
        if key.kit == kit:
            return key
    files = layout.report.glob(f"{RATING_KEY_PREFIX}*.json")
    kits = sorted(p.name[len(RATING_KEY_PREFIX) : -len(".json")] for p in files)
    kits += [load_record(RatingKey, legacy, fix=fix).kit] if legacy.is_file() else []
    held = f"its keys are of kits {', '.join(kits)}" if kits else f"it has no rating key; {fix}"
    raise RatingError(
        f"{path} is from rating kit {kit}, but {layout.root} holds no key for it ({held}); score it against the run "
        "whose `ghsae rate` wrote that page"
    )


def read_ratings(path: Path, rows: list[tuple[int, dict[str, str]]], key: RatingKey) -> dict[str, str]:
    """item id -> rating, checked against the kit's key. An item rated twice differently is refused,
    naming both rows; rated twice the same, it counts once (with a warning)."""
    known = {i.item for i in key.items}
    out: dict[str, tuple[int, str]] = {}
    repeated = []
    for n, row in rows:
        item, rating = row["item"], row["rating"]
        if item not in known:
            raise RatingError(f"{path} row {n}: item {item} is not on kit {key.kit}")
        if rating not in RATINGS:
            raise RatingError(f"{path} row {n}: rating {rating!r}; expected one of {', '.join(RATINGS)}")
        if item in out and out[item][1] != rating:
            first, said = out[item]
            raise RatingError(
                f"{path} rates item {item} twice, differently: row {first} says {said!r}, row {n} says {rating!r} "
                "(rows numbered as a spreadsheet shows them); delete the wrong row and score again"
            )
        if item in out:
            repeated.append(f"{item} (rows {out[item][0]} and {n})")
        out.setdefault(item, (n, rating))
    if repeated:
        log.warning("%s rates %d items twice the same way, counted once: %s", path, len(repeated), "; ".join(repeated))
    return {item: rating for item, (_, rating) in out.items()}


def score(run_dir: Path, ratings_csv: Path) -> list[Score]:
    """Unblind: the interpretable share per SAE and layer, with Wilson intervals; also written to RUN/report."""
    layout = RunLayout(Path(run_dir))
    path = Path(ratings_csv)
    rows = read_rows(path)  # before anything is written: a CSV without ratings leaves the scores as they were
    key = find_key(layout, kit_of(path, rows), path)
    ratings = read_ratings(path, rows, key)
    counts: dict[tuple[str, str, int], dict[str, int]] = {}
    for it in key.items:
        c = counts.setdefault((it.sae, it.kind, it.layer), dict.fromkeys(RATINGS, 0))
        if it.item in ratings:
            c[ratings[it.item]] += 1
    scores = []
    for (sae, kind, layer), c in sorted(counts.items(), key=lambda kv: (kv[0][1] != "group", kv[0][2], kv[0][0])):
        n = c["interpretable"] + c["not"]
        low, high = wilson(c["interpretable"], n)
        p = c["interpretable"] / n if n else float("nan")
        scores.append(Score(sae, kind, layer, c["interpretable"], c["not"], c["unsure"], p, low, high))
    save_record(layout.report_file(RATING_SCORES), RatingScores(key.kit, tuple(scores)))
    return scores


def load_scores(layout: RunLayout) -> list[Score] | None:
    path = layout.report_file(RATING_SCORES)
    if not path.is_file():
        return None
    return list(load_record(RatingScores, path, fix="score the ratings again with `ghsae rate RUN --score CSV`").scores)


def table_lines(scores: list[Score]) -> list[str]:
    lines = ["SAE                 kind      layer  interp.  not  unsure  share   95% CI (Wilson)"]
    for s in scores:
        share = "–" if math.isnan(s.proportion) else f"{s.proportion:.2f}"
        ci = "–" if math.isnan(s.low) else f"[{s.low:.2f}, {s.high:.2f}]"
        lines.append(
            f"{s.sae:<19} {s.kind:<9} {s.layer:>5}  {s.interpretable:>7}  {s.not_interpretable:>3}  {s.unsure:>6}  "
            f"{share:>5}   {ci}"
        )
    return lines


def ratings_section(scores: list[Score] | None) -> str:
    if not scores:
        return (
            "<p>No ratings scored yet. Write a blind rating page with <code>ghsae rate RUN [--baseline BASE] "
            "--latents 96</code>, rate it in a browser, download the CSV and run <code>ghsae rate RUN --score "
            "ratings.csv</code>; the next report shows the result here.</p>"
        )
    rows = "".join(
        f"<tr><td>{html.escape(s.sae)}</td><td>{s.kind}</td><td>{s.layer}</td><td>{s.interpretable}</td>"
        f"<td>{s.not_interpretable}</td><td>{s.unsure}</td>"
        f"<td>{'–' if math.isnan(s.proportion) else f'{s.proportion:.2f}'}</td>"
        f"<td>{'–' if math.isnan(s.low) else f'{s.low:.2f}–{s.high:.2f}'}</td></tr>"
        for s in scores
    )
    return (
        "<p>Share of latents rated interpretable (unsure left out), per SAE and layer, from the blind rating kit; "
        "95% Wilson intervals.</p><table><thead><tr><th>SAE</th><th>kind</th><th>layer</th><th>interpretable</th>"
        f"<th>not</th><th>unsure</th><th>share</th><th>95% CI</th></tr></thead><tbody>{rows}</tbody></table>"
    )

