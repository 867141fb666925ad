//! Fuzzes the SOCKS4/4a request decoder: it must never panic, never claim more
//! bytes than it was given, and answer the same for a request followed by more bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxyd::protocol::socks4::{parse_request, ParseError, MAX_REQUEST_LEN};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok((req, used)) => {
            assert!(used <= data.len() && used <= MAX_REQUEST_LEN);
            // The decoded request does not depend on what follows it.
            let (again, used_again) = parse_request(&data[..used]).expect("the request alone parses");
            assert_eq!((again, used_again), (req, used));
        }
        Err(ParseError::Incomplete) => assert!(data.len() < MAX_REQUEST_LEN),
        Err(e) => {
            let _ = e.reply();
        }
    }
});
