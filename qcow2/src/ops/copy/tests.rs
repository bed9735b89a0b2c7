//! The engine on synthetic readers and sinks: order, buffers, every failure path.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// [`run`] over every window of `plan`.
fn run_all<T: Send, S: Sink<T>, W: JobWriter<S::Job>>(
    plan: Plan,
    read: impl Fn(&mut Pieces<'_, T>) -> Result<()> + Sync,
    sink: &mut S,
    writer: W,
) -> Result<()> {
    run(plan, &WindowSet::all(&plan), read, sink, writer)
}

fn plan(windows: usize, readers: usize) -> Plan {
    Plan {
        size: windows as u64 * 4096 - 100, // the last window is short
        window: 4096,
        buffer: 4096,
        readers,
    }
}

/// One piece per window, at the window's positions.
fn one_piece<'a>(
    read: impl Fn(Window, &mut [u8]) -> Result<usize> + Sync + 'a,
) -> impl Fn(&mut Pieces<'_, usize>) -> Result<()> + Sync + 'a {
    move |p| p.fill(&read)
}

/// Fills each window with its index's byte; some windows are slow, so readers finish
/// out of order.
fn scrambled_read(w: Window, buf: &mut [u8]) -> Result<usize> {
    if w.index.is_multiple_of(3) {
        std::thread::sleep(Duration::from_millis(2));
    }
    buf.fill(w.index as u8);
    Ok(w.index)
}

#[derive(Default)]
struct Recorder {
    planned: Vec<(usize, u64, u64)>,
    fail_at: Option<usize>,
}

impl Sink<usize> for Recorder {
    type Job = usize;
    fn plan(&mut self, w: Window, item: usize, data: &[u8]) -> Result<usize> {
        assert_eq!(item, w.index);
        let data = &data[..w.len as usize];
        assert!(data.iter().all(|&b| b == w.index as u8));
        if self.fail_at == Some(w.index) {
            return Err(Error::bad_request("sink refuses"));
        }
        self.planned.push((w.index, w.offset, w.len));
        Ok(w.index)
    }
}

struct Written<'a> {
    order: &'a Mutex<Vec<usize>>,
    fail_at: Option<usize>,
    panic_at: Option<usize>,
}

impl JobWriter<usize> for Written<'_> {
    fn write(&mut self, job: usize, data: &[u8]) -> Result<()> {
        if self.panic_at == Some(job) {
            panic!("writer bug");
        }
        if self.fail_at == Some(job) {
            return Err(Error::io(
                "out",
                "writing data",
                job as u64,
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        assert!(data[..100].iter().all(|&b| b == job as u8));
        self.order.lock().unwrap().push(job);
        Ok(())
    }
}

fn writer(order: &Mutex<Vec<usize>>) -> Written<'_> {
    Written {
        order,
        fail_at: None,
        panic_at: None,
    }
}

#[test]
fn windows_reach_sink_and_writer_in_guest_order_whatever_the_readers() {
    for readers in [1, 2, 3, 5] {
        let order = Mutex::new(Vec::new());
        let mut sink = Recorder::default();
        run_all(
            plan(40, readers),
            one_piece(scrambled_read),
            &mut sink,
            writer(&order),
        )
        .unwrap();
        let indexes: Vec<usize> = sink.planned.iter().map(|p| p.0).collect();
        assert_eq!(indexes, (0..40).collect::<Vec<_>>(), "readers={readers}");
        assert_eq!(*order.lock().unwrap(), indexes);
        assert_eq!(sink.planned[39], (39, 39 * 4096, 4096 - 100));
    }
}

#[test]
fn an_empty_disk_copies_nothing() {
    let order = Mutex::new(Vec::new());
    let mut sink = Recorder::default();
    let p = Plan {
        size: 0,
        window: 4096,
        buffer: 4096,
        readers: 2,
    };
    run_all(p, one_piece(scrambled_read), &mut sink, writer(&order)).unwrap();
    assert!(sink.planned.is_empty());
}

#[test]
fn buffers_are_reused_not_allocated_per_window() {
    // Each reader owns BUFFERS_PER_READER buffers: count distinct buffer addresses.
    let seen = Mutex::new(std::collections::HashSet::new());
    let order = Mutex::new(Vec::new());
    let mut sink = Recorder::default();
    let read = |w: Window, buf: &mut [u8]| {
        seen.lock().unwrap().insert(buf.as_ptr() as usize);
        scrambled_read(w, buf)
    };
    run_all(plan(60, 2), one_piece(read), &mut sink, writer(&order)).unwrap();
    assert!(seen.lock().unwrap().len() <= 2 * BUFFERS_PER_READER);
}

#[test]
fn a_reader_error_ends_the_copy_with_that_error() {
    for readers in [1, 2, 4] {
        let order = Mutex::new(Vec::new());
        let mut sink = Recorder::default();
        let read = |w: Window, buf: &mut [u8]| {
            if w.index == 7 {
                return Err(Error::invalid("src", "bad L2 table"));
            }
            scrambled_read(w, buf)
        };
        let e = run_all(
            plan(100, readers),
            one_piece(read),
            &mut sink,
            writer(&order),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "src: bad L2 table");
        // Nothing past the failed window was planned.
        assert!(sink.planned.iter().all(|p| p.0 < 7));
    }
}

#[test]
fn a_sink_error_stops_readers_and_writer() {
    let order = Mutex::new(Vec::new());
    let reads = AtomicUsize::new(0);
    let mut sink = Recorder {
        fail_at: Some(5),
        ..Default::default()
    };
    let read = |w: Window, buf: &mut [u8]| {
        reads.fetch_add(1, Ordering::Relaxed);
        scrambled_read(w, buf)
    };
    let e = run_all(plan(1000, 2), one_piece(read), &mut sink, writer(&order)).unwrap_err();
    assert_eq!(e.to_string(), "sink refuses");
    assert_eq!(*order.lock().unwrap(), (0..5).collect::<Vec<_>>());
    // Readers stop within their buffers' reach, not at the end of the disk.
    assert!(reads.load(Ordering::Relaxed) < 5 + 2 * (2 * BUFFERS_PER_READER + 2));
}

#[test]
fn a_write_error_wins_over_what_it_causes() {
    let order = Mutex::new(Vec::new());
    let mut sink = Recorder::default();
    let w = Written {
        order: &order,
        fail_at: Some(3),
        panic_at: None,
    };
    let e = run_all(plan(1000, 2), one_piece(scrambled_read), &mut sink, w).unwrap_err();
    assert!(
        e.to_string().starts_with("out: writing data at offset 0x3"),
        "{e}"
    );
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
}

#[test]
fn panics_become_internal_errors_not_hangs() {
    let order = Mutex::new(Vec::new());
    let mut sink = Recorder::default();
    let read = |w: Window, buf: &mut [u8]| {
        if w.index == 4 {
            panic!("reader bug");
        }
        scrambled_read(w, buf)
    };
    let e = run_all(plan(50, 2), one_piece(read), &mut sink, writer(&order)).unwrap_err();
    assert!(matches!(e, Error::Internal { .. }), "{e}");
    assert!(e.to_string().contains("reader thread panicked"), "{e}");

    let mut sink = Recorder::default();
    let w = Written {
        order: &order,
        fail_at: None,
        panic_at: Some(2),
    };
    let e = run_all(plan(50, 2), one_piece(scrambled_read), &mut sink, w).unwrap_err();
    assert!(e.to_string().contains("writer thread panicked"), "{e}");
}

#[test]
fn windows_of_many_pieces_and_of_none_keep_their_order() {
    // Window i sends i % 4 pieces (none for every fourth): pieces arrive in (window, piece)
    // order whatever the readers, and empty windows cost no buffer.
    #[derive(Default)]
    struct Pieceworks(Vec<(usize, u8)>);
    impl Sink<(usize, u8)> for Pieceworks {
        type Job = ();
        fn plan(&mut self, w: Window, item: (usize, u8), data: &[u8]) -> Result<()> {
            assert_eq!(item.0, w.index);
            assert!(data.iter().all(|&b| b == item.1));
            self.0.push(item);
            Ok(())
        }
    }
    for readers in [1, 2, 3] {
        let mut sink = Pieceworks::default();
        let read = |p: &mut Pieces<'_, (usize, u8)>| {
            let w = p.window();
            for k in 0..(w.index % 4) as u8 {
                let Some(mut buf) = p.buffer() else {
                    return Ok(());
                };
                buf.fill(k);
                p.send((w.index, k), buf);
            }
            Ok(())
        };
        run_all(plan(30, readers), read, &mut sink, NoWriter).unwrap();
        let want: Vec<(usize, u8)> = (0..30)
            .flat_map(|i| (0..(i % 4) as u8).map(move |k| (i, k)))
            .collect();
        assert_eq!(sink.0, want, "readers={readers}");
    }
}

#[test]
fn a_window_set_copies_its_windows_only_in_order() {
    let p = plan(40, 2);
    let mut set = WindowSet::default();
    set.add_bytes(&p, 100, 200); // window 0
    set.add_bytes(&p, 4096 * 3 + 5, 4096 * 6); // windows 3..=5
    set.add_bytes(&p, 4096 * 5, 4096 * 5 + 1); // 5 again: not added twice
    set.add_bytes(&p, 4096 * 6, 4096 * 7); // 6 joins the run before
    set.add_bytes(&p, 4096 * 39, u64::MAX); // the last window, clamped
    set.add_bytes(&p, 4096 * 50, 4096 * 51); // past the plan: nothing
    let want = [0, 3, 4, 5, 6, 39];
    assert_eq!(set.len(), want.len());
    assert_eq!((0..set.len()).map(|k| set.nth(k)).collect::<Vec<_>>(), want);
    for readers in [1, 2, 3] {
        let order = Mutex::new(Vec::new());
        let mut sink = Recorder::default();
        let p = plan(40, readers);
        run(
            p,
            &set,
            one_piece(scrambled_read),
            &mut sink,
            writer(&order),
        )
        .unwrap();
        let planned: Vec<usize> = sink.planned.iter().map(|p| p.0).collect();
        assert_eq!(planned, want, "readers={readers}");
        assert_eq!(*order.lock().unwrap(), want);
    }
    let empty = WindowSet::default();
    let mut sink = Recorder::default();
    let order = Mutex::new(Vec::new());
    run(
        p,
        &empty,
        one_piece(scrambled_read),
        &mut sink,
        writer(&order),
    )
    .unwrap();
    assert!(sink.planned.is_empty());
    assert_eq!(WindowSet::all(&p).len(), 40);
    assert_eq!(WindowSet::all(&p).nth(39), 39);
}
