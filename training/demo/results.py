"""Step 5: what came back. The triage table (most suspicious first), the AUCs on the test studies, the
key images of the flagged studies as PNGs, and where the SRs and HL7 messages went; the rows are read
from the daemon's own store.

Two scores per study (issue 12): the paper's global log p(normal|x), and the region score, the most
abnormal lesion-sized window of its voxel map (in normal s.d.; low = abnormal), with where that window
is. ``flagged`` is the daemon's decision under ``[scoring] flag_policy`` (global, region or either);
the table's ``by`` column says which score(s) were under their own calibrated threshold when flagged,
so a newcomer sees whether the whole-volume score or the window raised it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.demo.plan import Plan, say


@dataclass
class Truth:
    study_uid: str
    name: str  # the study's folder, e.g. study_0003
    label: str
    lesion: str
    subtype: str

    @property
    def text(self) -> str:
        if self.label == "normal":
            return "normal"
        return f"{self.lesion} ({self.subtype})" if self.subtype else self.lesion or self.label


def read_truth(folder: Path) -> dict[str, Truth]:
    out: dict[str, Truth] = {}
    with (folder / "truth.jsonl").open() as f:
        for line in f:
            t = json.loads(line)
            out[t["study_uid"]] = Truth(
                t["study_uid"],
                Path(t["study_dir"]).name,
                t["label"],
                t["lesion"],
                t.get("lesion_subtype", ""),
            )
    return out


def hl7_priorities(messages: Sequence[str], uids: set[str]) -> dict[str, list[str]]:
    """study UID -> the OBR-5 priorities of the ORU^R01 messages that name it."""
    out: dict[str, list[str]] = {}
    for text in messages:
        uid = next((u for u in uids if u in text), None)
        obr = next((seg.split("|") for seg in text.split("\r") if seg.startswith("OBR|")), None)
        if uid is not None and obr is not None and len(obr) > 5:
            out.setdefault(uid, []).append(obr[5])
    return out


def build_rows(
    store_root: Path,
    truth: dict[str, Truth],
    studies: dict[str, dict[str, Any]],
    srs: dict[str, int],
    hl7: dict[str, list[str]],
) -> list[dict[str, Any]]:
    """One row per test study (scored ones sorted most suspicious first, then the unscored)."""
    from triage.store.db import Store

    rows = []
    with Store(store_root) as store:
        for uid, t in truth.items():
            score = store.score(uid) or {}
            st = studies.get(uid, {})
            centre = score.get("region_center_mm")
            rows.append(
                {
                    "study": t.name,
                    "study_uid": uid,
                    "state": st.get("state", "missing"),
                    "reason": st.get("reason"),
                    "log_posterior": score.get("log_posterior"),
                    "percentile": score.get("percentile"),
                    "flagged": score.get("flagged"),
                    "threshold": score.get("threshold"),
                    "global_flagged": score.get("global_flagged"),
                    "flag_policy": score.get("flag_policy"),
                    "flagged_by": flagged_by(score),
                    "region_score": score.get("region_score"),
                    "region_percentile": score.get("region_percentile"),
                    "region_threshold": score.get("region_threshold"),
                    "region_flagged": score.get("region_flagged"),
                    "region_window_mm": score.get("region_window_mm"),
                    "region_center_mm": [round(float(v)) for v in centre] if centre else None,
                    "region_sop_instance_uid": score.get("region_sop_instance_uid"),
                    "key_images": [],
                    "truth": t.text,
                    "abnormal": t.label != "normal",
                    "sr_in_pacs": srs.get(uid, 0),
                    "hl7_priority": "/".join(hl7.get(uid, [])) or None,
                }
            )
    scored = sorted((r for r in rows if r["log_posterior"] is not None), key=lambda r: r["log_posterior"])
    return scored + [r for r in rows if r["log_posterior"] is None]


def flagged_by(score: dict[str, Any]) -> str | None:
    """Which score flagged a flagged study under its policy: "global", "region" or "both" (None when not
    flagged or not scored). Under "either" both may be under their thresholds; under "global" or
    "region" only the policy's own score counts."""
    if not score.get("flagged"):
        return None
    policy = score.get("flag_policy") or "global"
    g = bool(score.get("global_flagged", score.get("flagged"))) and policy in ("global", "either")
    r = bool(score.get("region_flagged")) and policy in ("region", "either")
    return "both" if g and r else "global" if g else "region" if r else None


def auc_of(rows: Sequence[dict[str, Any]], field: str = "log_posterior") -> float | None:
    """ROC AUC of ``-field`` (a low score is abnormal) for abnormal vs normal on the rows that have it
    (None: one class only, or no row has the field)."""
    from sklearn.metrics import roc_auc_score

    scored = [r for r in rows if r.get(field) is not None]
    y = [int(r["abnormal"]) for r in scored]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, [-float(r[field]) for r in scored]))


def write_key_images(rows: Sequence[dict[str, Any]], store_root: Path, out: Path) -> Path:
    """The daemon's key images of every flagged study as PNGs under ``out/key_images`` (emptied first:
    the daemon's state is new each run), each row's ``key_images`` set to its PNGs relative to ``out``.
    Returns the folder."""
    import shutil

    from training.evaluate.maps import write_key_image_pngs

    folder = out / "key_images"
    shutil.rmtree(folder, ignore_errors=True)
    for r in rows:
        if r["flagged"]:
            pngs = write_key_image_pngs(store_root / "results" / r["study_uid"], folder,
                                        prefix=f"{r['study_uid']}-")
            r["key_images"] = [str(p.relative_to(out)) for p in pngs]
    return folder


def _centre(r: dict[str, Any]) -> str:
    c = r.get("region_center_mm")
    return "-" if not c else "(" + ",".join(f"{v:.0f}" for v in c) + ")"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line a study: global score and percentile, region score and percentile, the policy's flag,
    which score raised it, the region's centre (patient LPS mm, rounded), truth, SR and HL7 priority."""
    say(
        f"  {'#':>3}  {'study':<11} {'log p(normal|x)':>16} {'pctl':>5} {'region':>7} {'rpctl':>5}  "
        f"{'flag':<5} {'by':<6} {'region centre mm':<18} {'truth':<30} {'SR':>2} {'HL7':>3}"
    )
    for i, r in enumerate(rows, 1):
        if r["log_posterior"] is None:
            why = f"{r['state']}: {r['reason'] or ''}"[:60]
            say(f"  {i:>3}  {r['study']:<11} {'-':>16} {'-':>5} {'-':>7} {'-':>5}  {'-':<5} {'-':<6} "
                f"{'-':<18} {r['truth']:<30} {why}")
            continue
        say(
            f"  {i:>3}  {r['study']:<11} {r['log_posterior']:>16.1f} {_num(r['percentile'], '.0f'):>5} "
            f"{_num(r['region_score'], '.2f'):>7} {_num(r['region_percentile'], '.0f'):>5}  "
            f"{'FLAG' if r['flagged'] else '-':<5} {r['flagged_by'] or '-':<6} {_centre(r):<18} "
            f"{r['truth']:<30} {r['sr_in_pacs']:>2} {r['hl7_priority'] or '-':>3}"
        )


def _policy(scored: Sequence[dict[str, Any]]) -> str:
    policies = sorted({str(r.get("flag_policy") or "global") for r in scored})
    return "/".join(policies) or "-"


def print_summary(rows: Sequence[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The AUC and operating-point lines under the table; returns what demo.json keeps of them."""
    auc = auc_of(rows)
    auc_region = auc_of(rows, "region_score")
    scored = [r for r in rows if r["log_posterior"] is not None]
    n_abn = sum(r["abnormal"] for r in scored)
    flagged = [r for r in scored if r["flagged"]]
    tp = sum(r["abnormal"] for r in flagged)
    has_region = any(r["region_score"] is not None for r in scored)

    def txt(a: float | None) -> str:
        return f"{a:.3f}" if a is not None else "n/a (one class only)"

    say(
        f"\n  AUC (abnormal vs normal) on these {len(scored)} studies "
        f"({len(scored) - n_abn} normal, {n_abn} abnormal): log p(normal|x) {txt(auc)}; region score "
        + (txt(auc_region) if has_region else "n/a (the model set keeps no region calibration)")
    )
    if scored:
        sens = tp / n_abn if n_abn else float("nan")
        spec = 1 - (len(flagged) - tp) / max(1, len(scored) - n_abn)
        by = {k: sum(r["flagged_by"] == k for r in flagged) for k in ("global", "region", "both")}
        say(
            f"  at the operating point (flag_policy {_policy(scored)}): {len(flagged)} flagged "
            f"(by global {by['global']}, region {by['region']}, both {by['both']}), "
            f"sensitivity {sens:.2f}, specificity {spec:.2f}"
        )
    say(
        f"  ({plan.preset}, a {plan.steps}-step trunk and {max(1, plan.steps // 2)}-step branches on "
        f"{plan.normal} normals and "
        f"{plan.mixture_normal + plan.mixture_abnormal} mixture studies:\n   a demo-sized model, not a "
        "validated one; `training experiment` runs the paper's protocol at scale.)"
    )
    return {
        "auc": auc,
        "auc_region": auc_region,
        "flag_policy": _policy(scored),
        "rows": list(rows),
        "flagged": len(flagged),
        "flagged_by": {k: sum(r["flagged_by"] == k for r in flagged) for k in ("global", "region", "both")},
    }


def print_key_images(rows: Sequence[dict[str, Any]], shown_as: str) -> None:
    """Where the flagged studies' key images are (``shown_as``: their folder as the user should read it)."""
    flagged = [r for r in rows if r["flagged"]]
    if not flagged:
        say("\n  key images: no study flagged, none written")
        return
    n = sum(len(r["key_images"]) for r in flagged)
    studies = "study" if len(flagged) == 1 else "studies"
    say(
        f"\n  key images: {n} PNGs of the {len(flagged)} flagged {studies} under {shown_as}\n"
        "  (the source slices through each region, its map as a colour overlay):"
    )
    for r in flagged:
        pngs = r["key_images"]
        what = f"{len(pngs)} ({Path(pngs[0]).name} ...)" if pngs else "none (no region map was kept for it)"
        say(f"    {r['study']:<11} {what}")


def print_deliveries(rows: Sequence[dict[str, Any]], n_messages: int, pacs: str, results_dir: str) -> None:
    """Where the SRs and the HL7 messages went (``pacs``: its AE title and port, in words)."""
    n_sr = sum(1 for r in rows if r["sr_in_pacs"])
    prio = [p for r in rows for p in (r["hl7_priority"] or "").split("/") if p]
    say(
        f"\n  SRs: {n_sr} of {len(rows)} studies have their Structured Report in the PACS ({pacs});\n"
        f"       copies under {results_dir}"
    )
    say(
        f"  HL7: {n_messages} ORU^R01 acknowledged by the RIS listener "
        f"({prio.count('S')} priority S = flagged, {prio.count('R')} routine)"
    )
