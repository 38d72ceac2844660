"""Step 5: what came back. The triage table (most suspicious first), the AUC on the test studies, and
where the SRs and HL7 messages went; the rows are read from the daemon's own store."""

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
            score = store.score(uid)
            st = studies.get(uid, {})
            rows.append(
                {
                    "study": t.name,
                    "study_uid": uid,
                    "state": st.get("state", "missing"),
                    "reason": st.get("reason"),
                    "log_posterior": score["log_posterior"] if score else None,
                    "percentile": score.get("percentile") if score else None,
                    "flagged": score.get("flagged") if score else None,
                    "threshold": score.get("threshold") if score else None,
                    "truth": t.text,
                    "abnormal": t.label != "normal",
                    "sr_in_pacs": srs.get(uid, 0),
                    "hl7_priority": "/".join(hl7.get(uid, [])) or None,
                }
            )
    scored = sorted((r for r in rows if r["log_posterior"] is not None), key=lambda r: r["log_posterior"])
    return scored + [r for r in rows if r["log_posterior"] is None]


def auc_of(rows: Sequence[dict[str, Any]]) -> float | None:
    """ROC AUC of -log p(normal|x) for abnormal vs normal on the scored rows (None: one class only)."""
    from sklearn.metrics import roc_auc_score

    scored = [r for r in rows if r["log_posterior"] is not None]
    y = [int(r["abnormal"]) for r in scored]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, [-r["log_posterior"] for r in scored]))


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    say(
        f"  {'#':>3}  {'study':<11} {'log p(normal|x)':>16} {'pctl':>6}  {'flag':<7} {'truth':<30} "
        f"{'SR':>2} {'HL7':>3}"
    )
    for i, r in enumerate(rows, 1):
        if r["log_posterior"] is None:
            why = f"{r['state']}: {r['reason'] or ''}"[:60]
            say(f"  {i:>3}  {r['study']:<11} {'-':>16} {'-':>6}  {'-':<7} {r['truth']:<30} {why}")
            continue
        pct = "-" if r["percentile"] is None else f"{r['percentile']:.0f}"
        say(
            f"  {i:>3}  {r['study']:<11} {r['log_posterior']:>16.1f} {pct:>6}  "
            f"{'FLAG' if r['flagged'] else '-':<7} {r['truth']:<30} {r['sr_in_pacs']:>2} "
            f"{r['hl7_priority'] or '-':>3}"
        )


def print_summary(rows: Sequence[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """The AUC and operating-point lines under the table; returns what demo.json keeps of them."""
    auc = auc_of(rows)
    scored = [r for r in rows if r["log_posterior"] is not None]
    n_abn = sum(r["abnormal"] for r in scored)
    flagged = [r for r in scored if r["flagged"]]
    tp = sum(r["abnormal"] for r in flagged)
    auc_txt = f"{auc:.3f}" if auc is not None else "n/a (one class only)"
    say(
        f"\n  AUC (log p(normal|x), abnormal vs normal) on these {len(scored)} studies "
        f"({len(scored) - n_abn} normal, {n_abn} abnormal): {auc_txt}"
    )
    if scored:
        sens = tp / n_abn if n_abn else float("nan")
        spec = 1 - (len(flagged) - tp) / max(1, len(scored) - n_abn)
        say(
            f"  at the operating point: {len(flagged)} flagged, "
            f"sensitivity {sens:.2f}, specificity {spec:.2f}"
        )
    say(
        f"  ({plan.preset}, a {plan.steps}-step trunk and {max(1, plan.steps // 2)}-step branches on "
        f"{plan.normal} normals and "
        f"{plan.mixture_normal + plan.mixture_abnormal} mixture studies:\n   a demo-sized model, not a "
        "validated one; `training experiment` runs the paper's protocol at scale.)"
    )
    return {"auc": auc, "rows": list(rows), "flagged": len(flagged)}


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
