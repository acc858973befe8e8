"""CKKS parameter sets: the HE Standard's 128-bit table is enforced, with the parameter named."""

from __future__ import annotations

import pytest

from common.he import MAX_COEFF_BITS_128, HEParams, ParamSet, check_security


def test_named_sets_are_what_the_docs_say() -> None:
    # Execute
    fedrec, flare = ParamSet.FEDREC.params, ParamSet.FLARE_DEFAULT.params

    # Assert
    assert (fedrec.poly_modulus_degree, fedrec.coeff_mod_bit_sizes, fedrec.scale_bits) == (
        4096,
        (52, 52),
        38,
    )
    assert (flare.poly_modulus_degree, flare.coeff_mod_bit_sizes, flare.scale_bits) == (
        8192,
        (60, 40, 40),
        40,
    )
    assert fedrec.values_per_chunk == 4096 and fedrec.slots == 2048
    assert fedrec.data_bits == 52
    assert fedrec.max_abs_value == 2.0**12  # 2**(52 - 38 - 2)
    assert ParamSet.of_name("flare-default") is ParamSet.FLARE_DEFAULT


def test_standard_table_matches_he_standard() -> None:
    assert MAX_COEFF_BITS_128 == {
        1024: 27,
        2048: 54,
        4096: 109,
        8192: 218,
        16384: 438,
        32768: 881,
    }


def test_too_many_coefficient_bits_are_refused() -> None:
    # Execute / Assert: n=2048 allows 54 bits; 30 + 30 = 60
    with pytest.raises(ValueError, match="coeff_mod_bit_sizes total 60 bits exceeds 54"):
        HEParams(name="weak", poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 30), scale_bits=20)
    with pytest.raises(ValueError, match="coeff_mod_bit_sizes"):
        check_security(poly_modulus_degree=4096, total_coeff_bits=110)


def test_boundary_is_allowed() -> None:
    check_security(poly_modulus_degree=4096, total_coeff_bits=109)
    HEParams(name="edge", poly_modulus_degree=4096, coeff_mod_bit_sizes=(50, 59), scale_bits=36)


@pytest.mark.parametrize(
    ("degree", "sizes", "scale", "named"),
    [
        (3000, (40, 40), 30, "poly_modulus_degree"),
        (4096, (52,), 30, "coeff_mod_bit_sizes"),
        (4096, (61, 40), 40, "coeff_mod_bit_sizes"),
        (4096, (52, 52), 45, "scale_bits"),  # 52 - 45 < 10 bits of headroom
        (4096, (52, 52), 10, "scale_bits"),
    ],
)
def test_unusable_sets_name_the_parameter(
    degree: int, sizes: tuple[int, ...], scale: int, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        HEParams(name="x", poly_modulus_degree=degree, coeff_mod_bit_sizes=sizes, scale_bits=scale)


def test_json_round_trip_and_bad_json() -> None:
    # Prepare
    params = ParamSet.FEDREC.params

    # Execute / Assert
    assert HEParams.from_json(params.to_json()) == params
    with pytest.raises(ValueError, match="scale_bits"):
        HEParams.from_json({**params.to_json(), "scale_bits": "38"})
    with pytest.raises(ValueError, match="missing 'name'"):
        HEParams.from_json({"poly_modulus_degree": 4096})
    with pytest.raises(ValueError, match="unknown HE parameter set"):
        ParamSet.of_name("tiny")
