"""`make demo` (``python -m training.demo``): the whole product on one machine, in a few minutes.

What it does, in the order a hospital would meet it:

1. **Data.** ``training.synth.head`` writes four disjoint sets of synthetic head-CT studies under
   ``demo-out/data``: normals (M0's training set), an unlabeled mixture of normals and abnormals (M1's;
   its ``labels.csv``/``truth.jsonl`` are moved to ``demo-out/sealed`` before anything is trained, so
   M1 cannot see them), held-out normals for calibration, and a labeled held-out test set written
   *with* its distractor series (scouts, bone kernel, thin slices, reformats, dose report), because
   that is what a PACS sends.
2. **Models.** M0 and M1 are trained (``training.train.loop``, the ``cpu-small`` preset) on the volumes
   ``training.data.volumes`` builds through ``triage.assemble.volume``;
   ``triage.model.modelset.create_model_set`` sets the
   operating point on the calibration normals (specificity 0.9, no lesion label used), calibrates the
   region score on the same normals (both plans keep at least the 3 it needs) and the set is
   promoted in the daemon's registry.
3. **Peers.** Orthanc stands in for the PACS (a real one, temporary config, own storage), an MLLP
   listener for the RIS (it acknowledges every ORU^R01), and ``triage serve`` runs as a subprocess on
   ``demo-out/config.toml``: the repo's ``config.toml`` with only the keys the demo must change
   (a busy port, and with ``--quick`` a shorter quiet period); the demo prints each change. Its
   storage root (``var`` next to the config) is therefore ``demo-out/var``.
4. **Traffic.** The test studies are uploaded to Orthanc and Orthanc C-STOREs them to glowtriage, as
   a PACS auto-routing rule would; the demo polls ``triage status --json`` until every study is
   ``sent`` (or ``rejected``/``failed``).
5. **Result.** A triage table (most suspicious first) with each study's log p(normal|x), its
   percentile among the calibration normals, its region score (the most abnormal lesion-sized window
   of the voxel map) and percentile, the flag (under ``[scoring] flag_policy``) and which score raised
   it, the region's centre in patient mm, and the truth; the AUCs of both scores on these studies; the
   flagged studies' key images as PNGs under ``demo-out/key_images``; where the SRs and HL7 messages
   went. Everything is then stopped (daemon by SIGTERM).

**The chest path** (``python -m training.demo --kind cxr``, output ``demo-out-cxr``): the same five
steps with synthetic chest radiographs (``training synth --kind cxr``: CR and DX from six vendor
habits, abnormal kinds consolidation, effusion, pneumothorax, nodule/mass, cardiomegaly; the test set
with lateral views the daemon skips), the ``cpu-cxr`` preset (``test-tiny-2d`` with ``--quick``), a chest
(``cxr``) model set promoted as ``current-cxr``, and studies the daemon assembles as radiographs
(:mod:`triage.assemble.radiograph`) and reports as "Plain chest X-ray". A chest set keeps a region
calibration like a head set (:mod:`triage.model.radiomap`), so its table gives both scores and both
AUCs, the region's centre as [x, y] mm on the image, and key images of its flagged studies.

Re-running reuses the data, the volume cache, the trained models and the model set when they were made
with the same plan (``--fresh`` redoes everything); the daemon's state and the PACS are new each run.
Nothing here is tuned to the synthetic lesions: the AUC printed is whatever the models reach in the
few minutes of CPU training a demo can afford. ``training experiment`` runs the paper's protocol at a
size that means something.

Modules, in the order of a run: :mod:`.plan` (sizes and presets), :mod:`.data` (1), :mod:`.models` (2, and
the model set of 3), :mod:`.config` (the daemon's config), :mod:`.peers` (4: the peers from
:mod:`training.harness`, traffic), :mod:`.results` (5), :mod:`.cli` (the command line and the run).
"""

from __future__ import annotations

from training.demo.cli import main, run
from training.demo.config import Ports, choose_ports, write_demo_config
from training.demo.plan import CXR_FULL, CXR_QUICK, FULL, QUICK, DemoError, Plan
from training.harness.config import set_toml_key

__all__ = [
    "CXR_FULL",
    "CXR_QUICK",
    "FULL",
    "QUICK",
    "DemoError",
    "Plan",
    "Ports",
    "choose_ports",
    "main",
    "run",
    "set_toml_key",
    "write_demo_config",
]
