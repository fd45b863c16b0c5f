//! A consumed record's headers, read straight from librdkafka.
//!
//! rdkafka's `Headers::try_get` turns each header name into `&str` with an
//! `unwrap`: one record with a header name that is not UTF-8 (any producer
//! can send one) would panic the consumer loop on every restart. Names are
//! handed over here as bytes, and nothing is copied.

use std::ffi::CStr;

use rdkafka::bindings as rd;
use rdkafka::message::BorrowedMessage;

/// Calls `f(name, value)` for each header of `m`, in order (`None`: a null
/// value). Costs one call into librdkafka for a record without headers.
pub fn for_each<'m>(m: &'m BorrowedMessage<'_>, mut f: impl FnMut(&'m [u8], Option<&'m [u8]>)) {
    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is a live message for as long as `m` is borrowed;
    // librdkafka parses its headers once and keeps them, owned by the
    // message, so every pointer read below lives as long as `'m`. Names are
    // NUL-terminated C strings; values are `size` bytes or null.
    unsafe {
        if rd::rd_kafka_message_headers(m.ptr(), &mut headers)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || headers.is_null()
        {
            return;
        }
        let count = rd::rd_kafka_header_cnt(headers);
        for i in 0..count {
            let mut name = std::ptr::null();
            let mut value = std::ptr::null();
            let mut size = 0;
            if rd::rd_kafka_header_get_all(headers, i, &mut name, &mut value, &mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || name.is_null()
            {
                break;
            }
            let name: &'m [u8] = CStr::from_ptr(name).to_bytes();
            let value: Option<&'m [u8]> = match value.is_null() {
                true => None,
                false if size == 0 => Some(&[]),
                false => Some(std::slice::from_raw_parts(value.cast::<u8>(), size)),
            };
            f(name, value);
        }
    }
}
