"""Homomorphic encryption of model updates (CKKS through TenSEAL / Microsoft SEAL).

Clients encrypt their DP-noised updates (:func:`encrypt_update`), the server checks and adds the
ciphertexts with a context that holds no secret key (:func:`check_update`, :class:`SumAccumulator`,
:func:`add_updates`), and a committee of key-holding clients decrypts, noise-floods and rounds the
sum (:func:`decrypt_sum`) and releases it only when its members agree (:func:`committee_agree`).

Modules: :mod:`~common.he.params` (parameter sets, HE Standard check), :mod:`~common.he.keys`
(key folders), :mod:`~common.he.wire` (versioned wire format, Flower records),
:mod:`~common.he.codec` (encrypt, check, add, decrypt), :mod:`~common.he.release` (flooding and
committee agreement).
"""

from common.he.codec import (
    SumAccumulator,
    add_updates,
    check_update,
    decrypt_sum,
    encrypt_update,
)
from common.he.keys import (
    ClientKeys,
    KeyDirError,
    KeyFiles,
    ServerKeys,
    fingerprint_of,
    generate_keys,
    init_keys,
    load_client_context,
    load_server_context,
)
from common.he.params import MAX_COEFF_BITS_128, HEParams, ParamSet, check_security
from common.he.release import (
    ckks_error_std,
    committee_agree,
    committee_tolerance,
    default_flood_std,
    flood_and_round_inplace,
    rounding_step,
)
from common.he.wire import (
    DECRYPT_MESSAGE_TYPE,
    FORMAT_VERSION,
    HE_FINGERPRINT_KEY,
    HE_RECORD_KEY,
    HE_SUM_KEY,
    CiphertextRejectedError,
    EncryptedSum,
    EncryptedUpdate,
    Layout,
    PayloadKind,
    RejectReason,
    TensorSpec,
    UpdateHeader,
    check_header,
    from_record,
    layout_of,
    sum_from_record,
    to_record,
)

__all__ = [
    "DECRYPT_MESSAGE_TYPE",
    "FORMAT_VERSION",
    "HE_FINGERPRINT_KEY",
    "HE_RECORD_KEY",
    "HE_SUM_KEY",
    "MAX_COEFF_BITS_128",
    "CiphertextRejectedError",
    "ClientKeys",
    "EncryptedSum",
    "EncryptedUpdate",
    "HEParams",
    "KeyDirError",
    "KeyFiles",
    "Layout",
    "ParamSet",
    "PayloadKind",
    "RejectReason",
    "ServerKeys",
    "SumAccumulator",
    "TensorSpec",
    "UpdateHeader",
    "add_updates",
    "check_header",
    "check_security",
    "check_update",
    "ckks_error_std",
    "committee_agree",
    "committee_tolerance",
    "decrypt_sum",
    "default_flood_std",
    "encrypt_update",
    "fingerprint_of",
    "flood_and_round_inplace",
    "from_record",
    "generate_keys",
    "init_keys",
    "layout_of",
    "load_client_context",
    "load_server_context",
    "rounding_step",
    "sum_from_record",
    "to_record",
]
