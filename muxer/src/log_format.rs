//! The human log format's lines, fields and timestamps, written byte for byte as
//! tracing-subscriber's defaults write them when colours are off (journald, files, pipes),
//! without the machinery that costs there. Measured with callgrind on a new connection through
//! the HTTP router: its one log line took 15 500 of muxer's 70 000 instructions. A third went to
//! styling with an empty style (every field name and `=` painted through nu_ansi_term), much of
//! the rest to formatting the same date and time again for every line; now it takes 4 900. With
//! colours on (a terminal), the defaults run as they are.
use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Whole lines as the default `Full` format writes them with colours off: timestamp, level,
/// target, fields. Its own version writes the level and the target through `write!` and
/// styles painted with nothing, 1 000 of a connection line's 6 000 instructions (callgrind);
/// here they are plain strings. Lines the default format would decorate further (spans in
/// scope, records from the `log` crate, whose target is a field, colours) go to it as they are.
#[derive(Debug)]
pub(crate) struct PlainEvent<T = CachedTime> {
    timer: T,
    default: Format<Full, T>,
}

impl Default for PlainEvent {
    fn default() -> Self {
        PlainEvent::with_timer(CachedTime)
    }
}

impl<T: FormatTime + Clone> PlainEvent<T> {
    pub(crate) fn with_timer(timer: T) -> Self {
        PlainEvent {
            default: Format::default().with_timer(timer.clone()),
            timer,
        }
    }
}

impl<S, N, T> FormatEvent<S, N> for PlainEvent<T>
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
    N: for<'writer> FormatFields<'writer> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        if writer.has_ansi_escapes()
            || metadata.target() == "log"
            || context.event_scope().is_some()
        {
            return self.default.format_event(context, writer, event);
        }
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        // The space after the time, and the level padded to five characters.
        writer.write_str(match *metadata.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        writer.write_str(metadata.target())?;
        writer.write_str(": ")?;
        context.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// Event fields as [`DefaultFields`] writes them without colours: `message` first as written,
/// then `name=value` with values in their `Debug` form, separated by spaces.
#[derive(Debug, Default)]
pub(crate) struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes fields as [`DefaultVisitor`] does with colours off.
struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    /// No field written yet (the first needs no separating space).
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Starts a `name=` field (after a space unless it is the first) and returns whether to
    /// write its value: not after an error, nor for `log.*` fields (the `log` crate's metadata,
    /// which the line already shows).
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        self.pad();
        if self.result.is_err() {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self
            .writer
            .write_str(name)
            .and_then(|()| self.writer.write_char('='));
        self.result.is_ok()
    }

    fn pad(&mut self) {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.result = self.writer.write_char(' ');
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // As `DefaultVisitor`: the message as written, other strings in their `Debug` form,
        // which for a string with nothing to escape is the string in quotes.
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else if !needs_no_escaping(value) {
            self.record_debug(field, &value);
        } else if self.start(field) {
            self.result = self
                .writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // Rare, and written with its sources: left to the default visitor, on the same line.
        if self.result.is_err() {
            return;
        }
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        default.record_error(field, value);
        self.result = default.finish();
        self.is_empty = false;
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() != "message" {
            if self.start(field) {
                self.result = write!(self.writer, "{value:?}");
            }
            return;
        }
        if self.result.is_err() {
            return;
        }
        self.pad();
        if self.result.is_err() {
            return;
        }
        self.result = if self.writer.sanitizes_ansi_escapes() {
            write!(Sanitizing(&mut self.writer), "{value:?}")
        } else {
            write!(self.writer, "{value:?}")
        };
    }
}

/// Whether `Debug` writes `text` as it is, between quotes: printable ASCII other than `"` and
/// `\`.
fn needs_no_escaping(text: &str) -> bool {
    text.bytes()
        .all(|byte| (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\')
}

/// Escapes what a terminal would take for a control sequence, as tracing-subscriber does for
/// messages: ESC, BEL, BS, FF, DEL and the C1 controls.
struct Sanitizing<'a, 'writer>(&'a mut Writer<'writer>);

impl fmt::Write for Sanitizing<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // In UTF-8 the C1 controls are 0xC2 0x80–0x9F: text without 0xC2 has none.
        if !text
            .bytes()
            .any(|byte| matches!(byte, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2))
        {
            return self.0.write_str(text);
        }
        for ch in text.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                ch if ('\u{80}'..='\u{9f}').contains(&ch) => {
                    write!(self.0, "\\u{{{:x}}}", ch as u32)?;
                }
                ch => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

/// UTC timestamps as tracing-subscriber's default timer writes them
/// (`2026-12-01T00:06:44.027829Z`), the date and time of day formatted once per second per
/// thread.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CachedTime;

/// `YYYY-MM-DDTHH:MM:SS`.
const SECOND_LEN: usize = 19;

thread_local! {
    /// The second last formatted on this thread, and its text.
    static LAST_SECOND: Cell<(u64, [u8; SECOND_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_LEN])) };
}

impl FormatTime for CachedTime {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        let Ok(since_epoch) = SystemTime::now().duration_since(UNIX_EPOCH) else {
            return tracing_subscriber::fmt::time::SystemTime.format_time(writer);
        };
        let seconds = since_epoch.as_secs();
        let (cached, mut text) = LAST_SECOND.get();
        if cached != seconds {
            match format_second(seconds) {
                Some(formatted) => text = formatted,
                None => return tracing_subscriber::fmt::time::SystemTime.format_time(writer),
            }
            LAST_SECOND.set((seconds, text));
        }
        // Only ASCII digits and separators were written.
        let second = std::str::from_utf8(&text).map_err(|_| fmt::Error)?;
        writer.write_str(second)?;
        write_fraction(writer, since_epoch.subsec_micros())
    }
}

/// Writes `.` and the microseconds as six digits, then `Z`: worked out by hand rather than with
/// `{:06}`, whose padding machinery cost 400 of a log line's instructions (callgrind).
fn write_fraction(writer: &mut Writer<'_>, micros: u32) -> fmt::Result {
    let mut text = *b".000000Z";
    let mut rest = micros.min(999_999);
    for digit in text[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    // Only ASCII was written.
    writer.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
}

/// `seconds` after the Unix epoch as `YYYY-MM-DDTHH:MM:SS` (UTC); `None` past year 9999.
fn format_second(seconds: u64) -> Option<[u8; SECOND_LEN]> {
    let time = UNIX_EPOCH.checked_add(std::time::Duration::from_secs(seconds))?;
    // humantime writes the same calendar with a `Z` after it, and fails past year 9999.
    let mut text = String::with_capacity(SECOND_LEN + 1);
    write!(text, "{}", humantime::format_rfc3339_seconds(time)).ok()?;
    text.as_bytes().get(..SECOND_LEN)?.try_into().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what a subscriber (or the log writer thread) writes.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug)]
    struct Failure(&'static str, Option<Box<Failure>>);

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Failure {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    /// Events with every kind of field, and values that need escaping.
    fn emit_events() {
        let address: std::net::SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let error = Failure("upstream closed", Some(Box::new(Failure("reset", None))));
        tracing::info!(
            client = %address,
            protocol = "http",
            backend = "quote\"and\\slash",
            padded = " spaced out ",
            upstream_source = "tab\there é \u{1b}[31m",
            bytes_in = 12_u64,
            signed = -7_i64,
            flag = true,
            ratio = 0.5_f64,
            list = ?["a", "b"],
            r#type = "raw",
            "connection closed"
        );
        tracing::warn!("message with \u{1b}[2J escape, \u{9b} C1, bell \u{7} and é");
        tracing::error!(
            error = &error as &(dyn std::error::Error + 'static),
            "failed"
        );
        tracing::info!(empty = "", "");
        tracing::debug!(only = 1_u64);
        tracing::trace!(target: "muxer::deep", "every level");
        tracing::info!(target: "log", "a target the log crate's records have");
        let span = tracing::info_span!("serve", peer = 7_u64);
        span.in_scope(|| tracing::warn!(inside = true, "in a span"));
        tracing::error!(parent: &span, "an explicit parent");
    }

    /// A clock that always tells the same time, so that two formatters' lines can be compared.
    #[derive(Clone, Copy, Debug)]
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
            writer.write_str("2026-12-01T00:00:00.000001Z")
        }
    }

    fn formatted(plain: bool) -> String {
        let captured = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE);
        if plain {
            let subscriber = builder
                .fmt_fields(PlainFields)
                .event_format(PlainEvent::with_timer(Fixed))
                .finish();
            tracing::subscriber::with_default(subscriber, emit_events);
        } else {
            let subscriber = builder.with_timer(Fixed).finish();
            tracing::subscriber::with_default(subscriber, emit_events);
        }
        captured.text()
    }

    #[test]
    fn lines_are_written_as_the_default_format_writes_them() {
        let default = formatted(false);
        assert_eq!(default.lines().count(), 9, "{default}");
        assert!(default.contains("serve{peer=7}: "), "{default}");
        assert!(
            default.contains("\\x1b[2J"),
            "messages are sanitised: {default}"
        );
        assert_eq!(formatted(true), default);
    }

    #[test]
    fn coloured_output_is_left_to_the_default_format() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(true)
            .without_time()
            .fmt_fields(PlainFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || tracing::info!(field = 1_u64, "hi"));
        assert!(
            captured.text().contains("\u{1b}[3mfield\u{1b}[0m"),
            "{}",
            captured.text()
        );
    }

    #[test]
    fn dates_are_those_of_the_calendar() {
        for (seconds, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_796_083_200, "2026-12-01T00:00:00"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (253_402_300_799, "9999-12-31T23:59:59"),
        ] {
            let formatted = format_second(seconds).unwrap();
            assert_eq!(std::str::from_utf8(&formatted).unwrap(), text);
        }
        assert_eq!(format_second(253_402_300_800), None);
    }

    #[test]
    fn microseconds_are_six_digits() {
        for micros in [0, 7, 42, 999, 1_000, 65_536, 100_000, 999_999] {
            let mut written = String::new();
            write_fraction(&mut Writer::new(&mut written), micros).unwrap();
            assert_eq!(written, format!(".{micros:06}Z"));
        }
    }

    #[test]
    fn timestamps_match_the_default_timer() {
        // The two clocks are read one after the other: retry until both fall in one second.
        for _ in 0..100 {
            let (mut default, mut cached) = (String::new(), String::new());
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut default))
                .unwrap();
            CachedTime
                .format_time(&mut Writer::new(&mut cached))
                .unwrap();
            CachedTime
                .format_time(&mut Writer::new(&mut cached))
                .unwrap();
            let cached = &cached[..cached.len() / 2];
            if default[..SECOND_LEN] == cached[..SECOND_LEN] {
                assert_eq!(default.len(), cached.len(), "{default} {cached}");
                assert_eq!(&default[SECOND_LEN..SECOND_LEN + 1], ".");
                assert!(cached.ends_with('Z'), "{cached}");
                return;
            }
        }
        panic!("the default timer and the cached one never agreed on the second");
    }
}
