"""The synthetic hospital federation: procedural chest X-ray DICOMs with known latent disease.

``synthesize(out_dir, ...)`` writes a federation in the format of ``mdmt.data.manifest``:

* prognosis hospitals ``A``..``F`` (MILD/SEVERE, the AIforCOVID centres' exact class counts at scale 1),
* the severity hospital ``BRIXIA`` (six zone scores, the published global-score distribution at scale 1),
* optionally ``DUAL``: a hospital that records both labels for each image,

plus, at the federation root, ``synth.json`` (parameters, counts, the oracle ceiling) and
``synth_truth.csv`` (per image: latent zone scores, burden, hidden factor, P(SEVERE)).

``layout="aiforcovid"`` / ``"brixia"`` write the same A-F / BRIXIA images and labels (byte-identical DICOMs)
in the datasets' published layouts instead, as input for ``mdmt.data.importers`` (docs/synthetic.md).

The generative model (every constant is documented in docs/synthetic.md):

1. Global Brixia score G (0..18) ~ the published BRIXIA distribution (``BRIXIA_GLOBAL_COUNTS``).
2. Zone scores z_A..z_F (each 0..3, sum G) ~ P(z | G) proportional to prod_k w_k ** z_k; the weights are
   fitted so that the mean zone profile over the published G distribution equals ``BRIXIA_ZONE_MEANS``.
3. Hidden non-image factor h ~ N(0, 1) (age / comorbidity stand-in, never rendered into the image).
4. logit P(SEVERE) = SEVERE_SLOPE * (G - SEVERE_CENTRE) + HIDDEN_WEIGHT * h.
5. Prognosis hospitals draw patients from 1-4 and accept them while their class quota is open, so the
   labels remain a faithful function of the latents; BRIXIA draws z | G for its exact G counts.
6. The image renders the anatomy of the patient and opacities whose density rises with each zone's score,
   then the site's (BRIXIA: the manufacturer's) acquisition look.

Modules: model (published targets, scaling rule, latent disease model), oracle (the oracle ceiling), looks
(acquisition looks), renderer (anatomy and radiograph rendering), writer (DICOM files and truth rows), plans
(site plans), layouts (the AIforCOVID / BRIXIA published layouts), summary (synth.json and ``format_summary``),
federation (``synthesize``).
"""

from __future__ import annotations

from mdmt.data.synth.federation import synthesize
from mdmt.data.synth.layouts import (
    AIFORCOVID_IMAGEFILE_DCM_SHARE,
    AIFORCOVID_IMG_DIRS,
    AIFORCOVID_NO_SUFFIX_SHARE,
    AIFORCOVID_RELEASE_SHARES,
    AIFORCOVID_SHEET_COLUMNS,
    AIFORCOVID_WORKBOOKS,
    BRIXIA_DICOM_DIR,
    BRIXIA_METADATA,
    BRIXIA_METADATA_COLUMNS,
    CONSENSUS_FLOOR,
    CONSENSUS_TESTSET_COUNT,
    LAYOUTS,
)
from mdmt.data.synth.looks import BRIXIA_LOOKS, SITE_LOOKS, Look, image_shape, look_for
from mdmt.data.synth.model import (
    BRIXIA_FLOOR,
    BRIXIA_GLOBAL_COUNTS,
    BRIXIA_IMAGES_PER_PATIENT,
    BRIXIA_MANUFACTURER_COUNTS,
    BRIXIA_PATIENT_GROUPING_SD,
    BRIXIA_ZONE_MEANS,
    DUAL_COUNTS,
    DUAL_FLOOR,
    DUAL_SITE,
    HIDDEN_WEIGHT,
    PROGNOSIS_COUNTS,
    PROGNOSIS_FLOOR,
    PROGNOSIS_SITES,
    SEVERE_CENTRE,
    SEVERE_SLOPE,
    SEVERITY_SITE,
    global_prior,
    model_zone_means,
    p_severe,
    p_severe_given_g,
    sample_zones,
    scaled_count,
    targets,
    zone_model,
)
from mdmt.data.synth.oracle import CEILING_AUC_RANGE, CEILING_MC_SAMPLES, oracle_ceiling
from mdmt.data.synth.renderer import anatomy, render, to_stored
from mdmt.data.synth.summary import format_summary
from mdmt.data.synth.writer import write_dicom

__all__ = [
    "AIFORCOVID_IMAGEFILE_DCM_SHARE",
    "AIFORCOVID_IMG_DIRS",
    "AIFORCOVID_NO_SUFFIX_SHARE",
    "AIFORCOVID_RELEASE_SHARES",
    "AIFORCOVID_SHEET_COLUMNS",
    "AIFORCOVID_WORKBOOKS",
    "BRIXIA_DICOM_DIR",
    "BRIXIA_FLOOR",
    "BRIXIA_GLOBAL_COUNTS",
    "BRIXIA_IMAGES_PER_PATIENT",
    "BRIXIA_LOOKS",
    "BRIXIA_MANUFACTURER_COUNTS",
    "BRIXIA_METADATA",
    "BRIXIA_METADATA_COLUMNS",
    "BRIXIA_PATIENT_GROUPING_SD",
    "BRIXIA_ZONE_MEANS",
    "CEILING_AUC_RANGE",
    "CEILING_MC_SAMPLES",
    "CONSENSUS_FLOOR",
    "CONSENSUS_TESTSET_COUNT",
    "DUAL_COUNTS",
    "DUAL_FLOOR",
    "DUAL_SITE",
    "HIDDEN_WEIGHT",
    "LAYOUTS",
    "PROGNOSIS_COUNTS",
    "PROGNOSIS_FLOOR",
    "PROGNOSIS_SITES",
    "SEVERE_CENTRE",
    "SEVERE_SLOPE",
    "SEVERITY_SITE",
    "SITE_LOOKS",
    "Look",
    "anatomy",
    "format_summary",
    "global_prior",
    "image_shape",
    "look_for",
    "model_zone_means",
    "oracle_ceiling",
    "p_severe",
    "p_severe_given_g",
    "render",
    "sample_zones",
    "scaled_count",
    "synthesize",
    "targets",
    "to_stored",
    "write_dicom",
    "zone_model",
]
