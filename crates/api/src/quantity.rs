//! Resource quantities (`500m`, `128Mi`, `1.5`, `2e3`) parsed into exact
//! milli-units, as the scheduler and metering compare them.

/// A parsed quantity in thousandths of the base unit (millicores, millibytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity(pub i128);

impl Quantity {
    pub fn millis(self) -> i128 {
        self.0
    }

    /// The value rounded up to whole units (bytes, cores).
    pub fn ceil_units(self) -> i128 {
        (self.0 + 999).div_euclid(1000)
    }
}

/// Parses a Kubernetes quantity string.
pub fn parse(s: &str) -> Result<Quantity, String> {
    let err = || {
        format!(
            "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$' (got {s:?})"
        )
    };
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.len() > 40 {
        return Err(err());
    }
    let (negative, digits) = match number.as_bytes()[0] {
        b'-' => (true, &number[1..]),
        b'+' => (false, &number[1..]),
        _ => (false, number),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|c| c.is_ascii_digit())
        || !frac_part.bytes().all(|c| c.is_ascii_digit())
    {
        return Err(err());
    }
    // Value = mantissa * 10^exp10 * 2^exp2, computed in millis.
    let mantissa: i128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| err())?;
    let mut exp10: i32 = 3 - frac_part.len() as i32;
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        s if s.starts_with(['e', 'E']) => exp10 += s[1..].parse::<i32>().map_err(|_| err())?,
        _ => return Err(err()),
    }
    if !(-40..=40).contains(&exp10) {
        return Err(format!("quantity {s:?} is out of range"));
    }
    let too_big = || format!("quantity {s:?} is too large");
    let mut v = mantissa.checked_mul(1i128 << exp2).ok_or_else(too_big)?;
    if exp10 >= 0 {
        v = v
            .checked_mul(10i128.checked_pow(exp10 as u32).ok_or_else(too_big)?)
            .ok_or_else(too_big)?;
    } else {
        // Round up below a milli, as Kubernetes does when it scales quantities.
        let d = 10i128.pow((-exp10) as u32);
        v = (v + d - 1) / d;
    }
    if v > i64::MAX as i128 * 1000 {
        return Err(too_big());
    }
    Ok(Quantity(if negative { -v } else { v }))
}

/// Renders `q` as Kubernetes prints a sum of quantities written like
/// `like`: whole units with `like`'s kind of suffix (binary `Ki`..`Ei`, or
/// decimal `k`..`E`) where it divides exactly, else milli-units (`1500m`).
pub fn format(q: Quantity, like: &str) -> String {
    let m = q.millis();
    if m % 1000 != 0 {
        return format!("{m}m");
    }
    let units = m / 1000;
    if units == 0 {
        return "0".into();
    }
    let binary = like.trim().ends_with('i');
    let decimal = like.trim().ends_with(['k', 'M', 'G', 'T', 'P', 'E']);
    let suffixes: &[(&str, i128)] = if binary {
        &[
            ("Ei", 1 << 60),
            ("Pi", 1 << 50),
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ]
    } else if decimal {
        &[
            ("E", 1_000_000_000_000_000_000),
            ("P", 1_000_000_000_000_000),
            ("T", 1_000_000_000_000),
            ("G", 1_000_000_000),
            ("M", 1_000_000),
            ("k", 1_000),
        ]
    } else {
        &[]
    };
    for (suffix, size) in suffixes {
        if units % size == 0 {
            return format!("{}{suffix}", units / size);
        }
    }
    units.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sums_as_kubernetes_prints_them() {
        let f = |s: &str, like: &str| format(parse(s).unwrap(), like);
        assert_eq!(f("1500m", "2"), "1500m");
        assert_eq!(f("2", "2"), "2");
        assert_eq!(f("0", "1Gi"), "0");
        assert_eq!(f("1536Mi", "2Gi"), "1536Mi");
        assert_eq!(f("2Gi", "4Gi"), "2Gi");
        assert_eq!(f("3000", "10k"), "3k");
        assert_eq!(f("1000", "1Gi"), "1000");
    }

    #[test]
    fn parses_kubernetes_forms() {
        let cases = [
            ("100m", 100),
            ("1", 1000),
            ("1.5", 1500),
            ("2k", 2_000_000),
            ("128Mi", 128 * 1024 * 1024 * 1000),
            ("1Gi", 1024 * 1024 * 1024 * 1000),
            ("2e3", 2_000_000),
            ("0.1", 100),
            ("-1", -1000),
            ("1u", 1),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s).unwrap().millis(), want, "{s}");
        }
        for bad in [
            "",
            "abc",
            "1Qi",
            "1..2",
            "--1",
            "1e999",
            "99999999999999999999999999999Ei",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
