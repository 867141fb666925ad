//! Fuzzes the command language the way the state file uses it: any text must
//! either load or fail with an error, never panic; and whatever loads must
//! export (the state file's form, and the compact one apart from password
//! hashes, which only `show-sensitive` writes) to a script that loads back to
//! the same configuration.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use proxyd::config::command::{ExportOptions, Menu};
use proxyd::config::{render, store};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = store::parse_script(text, Path::new("fuzz.rsc")) {
        let exported = render::export(&config, Menu::Root, &ExportOptions::state_file());
        let back = store::parse_script(&exported, Path::new("export.rsc")).expect("an export loads");
        assert_eq!(back, config);
        let compact = render::export(&config, Menu::Root, &ExportOptions::default());
        let back = store::parse_script(&compact, Path::new("compact.rsc")).expect("a compact export loads");
        let mut without_hashes = config.clone();
        for u in &mut without_hashes.users {
            u.password = Default::default();
        }
        assert_eq!(back, without_hashes);
    }
});
