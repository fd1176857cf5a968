//! How enumerations are stored where a column holds a number.

use omoi_domain::Phase;

/// The stored code of a phase. The numbers are part of the schema (tasks,
/// ticket plans and agents' phase lists hold them) and match the API's
/// `omoi.common.v1.Phase` numbering by choice, not by dependency.
pub(crate) fn phase_code(phase: Phase) -> i16 {
    match phase {
        Phase::Initial => 1,
        Phase::Implementation => 2,
        Phase::Integration => 3,
        Phase::Refactoring => 4,
    }
}

pub(crate) fn phase_of(code: i16) -> Option<Phase> {
    Phase::ALL.into_iter().find(|p| phase_code(*p) == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_codes_round_trip_and_stay_put() {
        let codes: Vec<i16> = Phase::ALL.into_iter().map(phase_code).collect();
        assert_eq!(codes, [1, 2, 3, 4], "stored codes are part of the schema");
        for p in Phase::ALL {
            assert_eq!(phase_of(phase_code(p)), Some(p));
        }
        assert_eq!(phase_of(0), None);
    }
}
