"""Real-time CTR bidder: featurization, scoring and the OpenRTB bid endpoint.

Public API:
    Featurizer(spec)         Cython featurizer: ``transform(records)`` and ``transform_into(buffers, records)``
    load_spec(path)          read and validate a bundle's ``spec.json`` (or the file itself)
    default_spec()           the iPinYou feature spec
    DEFAULT_BUNDLE           directory of the model bundle shipped with the package
    OPENRTB_EXAMPLES         directory of the IAB's OpenRTB 2.5/2.6 example requests (``bid-request-2.x/*.json``)
"""
from pathlib import Path

from bidder._features import Featurizer
from bidder.spec import FeatureSpec, FieldSpec, SpecError, default_spec, load_spec

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "default"
OPENRTB_EXAMPLES = Path(__file__).resolve().parent / "examples" / "openrtb"

__all__ = ["DEFAULT_BUNDLE", "OPENRTB_EXAMPLES", "FeatureSpec", "Featurizer", "FieldSpec", "SpecError", "default_spec", "load_spec"]
