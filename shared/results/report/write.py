"""write_report: every table, test and plot of a store's finished units written into one folder, with
report.md linking them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd

from mdmt.errors import MDMTError
from mdmt.results.report.ceiling import oracle_ceilings, unit_fed_dir
from mdmt.results.report.formatting import display_frame, tests_markdown, write_table
from mdmt.results.report.loco import write_loco_report
from mdmt.results.report.plots import plot_centres, plot_learning_auc, plot_learning_curves, plot_roc
from mdmt.results.report.records import PROTOCOL_TITLES, finished_units, learning_curves, prognosis_records, sort_rows
from mdmt.results.report.stats import compare_methods, gap_table
from mdmt.results.report.tables import PrognosisTables, prognosis_tables, severity_summary, severity_table
from mdmt.results.report.validation import mean_validation_curves, unit_validation, validation_table
from mdmt.store import RunStore

GAP_NOTE = (
    "MDMT minus centralised MDMT and minus the single-site models ('local'), on each backbone's pooled "
    "predictions, one pair per backbone and seed: mean difference (ACC, G-mean in percentage points; AUC in "
    "AUC units), its 95% t-interval and a 95% cluster bootstrap interval resampling backbones."
)
VALIDATION_NOTE = (
    "The training sites' prognosis validation histograms pooled, per unit: the AUC at the selected round and "
    "at the last round, mean over the backbone's units (seeds and folds); 'units with val AUC CI > 0.5': "
    "units whose selected-round stratified bootstrap 95% interval lies above 0.5. Validation data only."
)
METHOD_NOTE = (
    "Mean over backbones of the metrics on each backbone's pooled predictions (every fold's held-out or "
    "test counts at that fold's own threshold, summed). ACC, F1, G-mean, sens, spec in %. AUC interval: "
    "stratified bootstrap of the mean over backbones from their pooled histograms. 'local': mean over "
    "the single-site models (no interval); its n is the most patients one of them was scored on (each is "
    "scored on every held-out centre but its own)."
)


def _write_protocol(
    protocol: str, records: pd.DataFrame, out_dir: Path, n_boot: int, seed: int
) -> tuple[list[Path], list[str], PrognosisTables]:
    """The prognosis tables and plots of one protocol."""
    name = PROTOCOL_TITLES.get(protocol, protocol)
    t = prognosis_tables(records, n_boot, seed)
    files: list[Path] = []
    sections: list[str] = []
    specs = [
        (t.methods, f"methods_{protocol}", f"{name}: mean over backbones (pooled folds)", METHOD_NOTE),
        (
            t.backbones,
            f"backbones_{protocol}",
            f"{name}: per backbone",
            "Pooled predictions of all folds, plus each metric's mean and sample std (ddof 1) over folds.",
        ),
        (
            t.centres,
            f"centres_{protocol}",
            f"{name}: per centre (mean over backbones)",
            "Each centre's held-out (LOCO) or test (CV, pooled over folds) predictions at each fold's threshold.",
        ),
        (t.folds, f"folds_{protocol}", f"{name}: per fold", "One row per model and fold, at the selected round."),
    ]
    if len(t.local_sites):
        specs.append((t.local_sites, f"local_sites_{protocol}", f"{name}: single-site models per fold", ""))
    for df, stem, title, note in specs:
        paths, md = write_table(df, out_dir, stem, title, note)
        files += paths
        sections.append(md)
    files.append(plot_roc(records, f"ROC ({name}, pooled)", out_dir / f"roc_{protocol}.png"))
    files.append(
        plot_centres(t.centres, f"{name}: per centre, mean over backbones", out_dir / f"centres_{protocol}.png")
    )
    return files, sections, t


def _write_tests(backbones: pd.DataFrame, out_dir: Path, n_boot: int, seed: int) -> tuple[list[Path], list[str]]:
    """tests.csv, tests.md and tests.tex: MDMT against its baselines, per protocol; gaps_<P>.*: the price of
    federation."""
    tests = compare_methods(backbones, n_boot=n_boot, seed=seed)
    protocols = list(dict.fromkeys(tests["protocol"]))
    md = "\n".join(
        tests_markdown(tests[tests["protocol"] == p], f"{PROTOCOL_TITLES.get(p, p)}: paired tests") for p in protocols
    )
    paths = [out_dir / f"tests.{ext}" for ext in ("csv", "md", "tex")]
    tests.to_csv(paths[0], index=False)
    paths[1].write_text(md)
    paths[2].write_text(
        display_frame(tests).to_latex(
            index=False, escape=True, caption="Paired one-tailed tests of MDMT against its baselines", label="tab:tests"
        )
    )
    sections = [md]
    for p in protocols:
        gaps = gap_table(tests[tests["protocol"] == p])
        title = f"{PROTOCOL_TITLES.get(p, p)}: the price of federation"
        written, gap_md = write_table(gaps, out_dir, f"gaps_{p}", title, GAP_NOTE)
        paths += written
        sections.append(gap_md)
    return paths, sections


def _write_severity(store: RunStore, units: list[sqlite3.Row], out_dir: Path) -> tuple[list[Path], list[str]]:
    """severity.* (per unit) and severity_methods.* (mean over backbones); nothing if no unit trains severity."""
    severity = severity_table(store, units)
    if severity.empty:
        return [], []
    files, sections = [], []
    note = (
        "Accuracy and weighted F1 (%) at the selected round: 'val' = the severity sites' validation rows, "
        "'test' = the consensus test set."
    )
    for df, stem, title in (
        (severity_summary(severity), "severity_methods", "severity: mean over backbones"),
        (severity, "severity", "severity per model and fold"),
    ):
        paths, md = write_table(df, out_dir, stem, title, note)
        files += paths
        sections.append(md)
    return files, sections


def _write_learning_curves(
    store: RunStore, units: list[sqlite3.Row], out_dir: Path, n_boot: int, seed: int
) -> tuple[list[Path], list[str]]:
    """learning_curves.csv; per protocol learning_<P>.png, learning_auc_<P>.png and validation_<P>.*."""
    curves = learning_curves(store, units)
    files = [out_dir / "learning_curves.csv"]
    sections: list[str] = []
    curves.to_csv(files[0], index=False)
    per_unit = unit_validation(store, units, curves, n_boot, seed)
    means = mean_validation_curves(curves)
    for protocol in dict.fromkeys(curves["protocol"]):
        name = PROTOCOL_TITLES.get(protocol, protocol)
        files.append(
            plot_learning_curves(
                curves[curves["protocol"] == protocol],
                f"learning curves ({name})",
                out_dir / f"learning_{protocol}.png",
            )
        )
        here = means[means["protocol"] == protocol]
        if here.empty:
            continue
        files.append(
            plot_learning_auc(
                here, f"pooled validation AUC, mean per backbone ({name})", out_dir / f"learning_auc_{protocol}.png"
            )
        )
        written, md = write_table(
            validation_table(per_unit[per_unit["protocol"] == protocol]),
            out_dir,
            f"validation_{protocol}",
            f"{name}: validation AUC per method and backbone",
            VALIDATION_NOTE,
        )
        files += written
        sections.append(md)
    return files, sections


def _write_ceiling(
    store: RunStore, units: list[sqlite3.Row], out_dir: Path
) -> tuple[list[Path], dict[str | None, str]]:
    """ceiling.csv / .md / .tex: the oracle ceiling of each fed-dir the units ran on; and its line per fed-dir."""
    table, lines = oracle_ceilings(store, units)
    note = (
        "The best ACC and AUC of a predictor that reads the exact global score but not the hidden factor "
        "(mdmt.data.synth.oracle): 'generated' on the federation's prognosis patients, 'model (exact)' from the "
        "generative model. " + " ".join(dict.fromkeys(lines.values()))
    )
    paths, _ = write_table(table, out_dir, "ceiling", "oracle ceiling", note)
    return paths, lines


def code_line(units: list[sqlite3.Row]) -> str:
    """Which training code the units came from (the 'code' digest of their recipes, mdmt.fed.plan): one
    digest, several (then they are not one experiment's results), or none recorded."""
    digests: dict[str, int] = {}
    for u in units:
        try:
            code = (json.loads(u["recipe"] or "{}") or {}).get("code") or "not recorded"
        except (json.JSONDecodeError, AttributeError):
            code = "not recorded"
        digests[code] = digests.get(code, 0) + 1
    if len(digests) == 1:
        (code,) = digests
        return f"Training code: all {len(units)} units came from training code {code}."
    parts = ", ".join(f"{c} ({n} units)" for c, n in sorted(digests.items(), key=lambda x: -x[1]))
    return f"Training code: the units came from {len(digests)} versions of it: {parts}; rerun the others."


def write_report(store: RunStore, out_dir: Path, n_boot: int = 1000, seed: int = 0) -> str:
    """Write every table, test and plot of the store's finished units into ``out_dir``; return a summary:
    the main table of each protocol in markdown and the files written."""
    units = finished_units(store)
    if not units:
        return f"{store.path}: no finished unit (status 'done' with a selected round) yet; nothing to report"
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MDMTError(f"{out_dir}: cannot create the report folder ({exc.strerror}); choose another --out") from None

    records = prognosis_records(store, units)
    files, ceiling_lines = _write_ceiling(store, units, out_dir)
    fed_dirs = {(u["protocol"], unit_fed_dir(u)) for u in units}
    sections: list[str] = []
    main: list[str] = []
    backbones = []
    for protocol in sort_rows(records[["protocol"]].drop_duplicates(), ["protocol"])["protocol"]:
        written, mds, tables = _write_protocol(
            protocol, records[records["protocol"] == protocol], out_dir, n_boot, seed
        )
        # the ceiling of the fed-dirs this protocol's units ran on, under its methods table
        lines = dict.fromkeys(ceiling_lines[d] for p, d in sorted(fed_dirs, key=str) if p == protocol)
        mds[0] += "\n" + "\n\n".join(lines) + "\n"
        files += written
        sections += mds
        main.append(mds[0])
        backbones.append(tables.backbones)
    if backbones:
        written, mds = _write_tests(pd.concat(backbones, ignore_index=True), out_dir, n_boot, seed)
        files += written
        sections += mds
    written, mds = _write_severity(store, units, out_dir)
    files += written
    sections += mds
    written, mds = _write_learning_curves(store, units, out_dir, n_boot, seed)
    files += written
    sections += mds
    _, loco_csv, loco_md = write_loco_report(store, out_dir, n_boot=n_boot, seed=seed)
    files += [loco_csv, loco_md]

    figures = [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    code = code_line(units)
    (out_dir / "report.md").write_text(
        "# Results\n\n" + code + "\n\n" + "\n".join(sections) + "\n## Figures\n\n" + "\n\n".join(figures) + "\n"
    )
    files.insert(0, out_dir / "report.md")

    head = "\n".join(main) if main else "No prognosis results (no finished unit scores a held-out or test split)."
    return head + f"\n{code}\nwrote {len(files)} files to {out_dir}:\n" + "\n".join(f"  {p.name}" for p in files)
