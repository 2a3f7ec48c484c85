//! The pilot's national-language text: the UDHR in nine languages, embedded in the binary
//! (see `data/udhr/ATTRIBUTION.md`), so the pilot needs no data at run time.

/// `(code, English name, text)` for every embedded language.
pub const UDHR: [(&str, &str, &str); 9] = [
    ("lo", "Lao", include_str!("../../data/udhr/lo.txt")),
    ("km", "Khmer", include_str!("../../data/udhr/km.txt")),
    ("th", "Thai", include_str!("../../data/udhr/th.txt")),
    ("vi", "Vietnamese", include_str!("../../data/udhr/vi.txt")),
    ("my", "Burmese", include_str!("../../data/udhr/my.txt")),
    ("id", "Indonesian", include_str!("../../data/udhr/id.txt")),
    ("ms", "Malay", include_str!("../../data/udhr/ms.txt")),
    ("tl", "Tagalog", include_str!("../../data/udhr/tl.txt")),
    ("en", "English", include_str!("../../data/udhr/en.txt")),
];

/// The pilot's default federation: one lab per mainland and maritime South-East Asian
/// language of the issue brief.
pub const DEFAULT_LANGUAGES: [&str; 6] = ["lo", "km", "th", "vi", "my", "id"];

/// The English name and text of a language code.
pub fn udhr(code: &str) -> Option<(&'static str, &'static str)> {
    UDHR.iter()
        .find(|(c, _, _)| *c == code)
        .map(|(_, name, text)| (*name, *text))
}
