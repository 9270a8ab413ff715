//! The Wasm runtime against small hand-written guests (WAT): output and exit
//! codes, the memory limit, CPU quotas and yielding, traps, hostile modules
//! and the compile cache.

use std::time::Duration;

use wasmkube_runtime_wasm::{Config, ContainerSpec, Exit, WasmRuntime};

fn runtime(dir: &tempfile::TempDir) -> WasmRuntime {
    WasmRuntime::new(Config {
        cache_dir: dir.path().join("cache"),
        max_instances: 16,
        max_memory_bytes: 64 << 20,
        guest_ca_pem: None,
    })
    .unwrap()
}

fn spec(dir: &tempfile::TempDir, name: &str) -> ContainerSpec {
    ContainerSpec {
        args: vec![name.into()],
        stdout: dir.path().join(format!("{name}.out")).into(),
        stderr: dir.path().join(format!("{name}.err")).into(),
        ..Default::default()
    }
}

/// Prints `text` to stdout, then exits with `code`.
fn printer(text: &str, code: i32) -> Vec<u8> {
    wat(&format!(
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
          (memory (export "memory") 1)
          (data (i32.const 64) "{text}")
          (func (export "_start")
            (i32.store (i32.const 0) (i32.const 64))
            (i32.store (i32.const 4) (i32.const {len}))
            (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))
            (call $proc_exit (i32.const {code}))))"#,
        len = text.len(),
    ))
}

fn wat(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Spins forever.
const SPIN: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop (br 0))))"#;

#[tokio::test]
async fn output_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let hello = rt.load(&printer("hello from wasm", 0)).unwrap();
    let s = spec(&dir, "hello");
    let (exit, usage) = rt.run(&hello, &s).await.unwrap();
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(
        std::fs::read_to_string(s.stdout.path().unwrap()).unwrap(),
        "hello from wasm"
    );
    assert_eq!(usage.memory_high_water, 64 * 1024);
    let failing = rt.load(&printer("bye", 3)).unwrap();
    let (exit, _) = rt.run(&failing, &spec(&dir, "failing")).await.unwrap();
    assert_eq!((exit.clone(), exit.code()), (Exit::Code(3), 3));
}

#[tokio::test]
async fn memory_beyond_the_limit_is_an_oom_kill() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    // Grows one page at a time; traps as Rust's allocator does when a growth fails.
    let hog = rt
        .load(&wat(r#"(module (memory (export "memory") 1)
            (func (export "_start")
              (loop (if (i32.ne (memory.grow (i32.const 1)) (i32.const -1)) (then (br 1))))
              unreachable))"#))
        .unwrap();
    let mut s = spec(&dir, "hog");
    s.memory_limit = Some(2 << 20);
    let (exit, usage) = rt.run(&hog, &s).await.unwrap();
    match &exit {
        Exit::OomKilled { message } => assert!(message.contains("limit 2097152"), "{message}"),
        other => panic!("expected an OOM kill, got {other:?}"),
    }
    assert_eq!(exit.code(), 137);
    assert_eq!(usage.memory_high_water, 2 << 20);
    // A module whose initial memory is already over the limit never starts.
    let big = rt
        .load(&wat(
            r#"(module (memory (export "memory") 64) (func (export "_start")))"#,
        ))
        .unwrap();
    let (exit, _) = rt.run(&big, &s).await.unwrap();
    assert!(matches!(exit, Exit::OomKilled { .. }), "{exit:?}");
}

#[tokio::test]
async fn traps_and_hostile_modules_fail_only_their_own_run() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let recurse = rt
        .load(&wat(r#"(module (memory (export "memory") 1)
            (func $f (call $f)) (func (export "_start") (call $f)))"#))
        .unwrap();
    let (exit, _) = rt.run(&recurse, &spec(&dir, "recurse")).await.unwrap();
    match exit {
        Exit::Trap { message } => assert_eq!(message, "wasm trap: call stack exhausted"),
        other => panic!("expected a trap, got {other:?}"),
    }
    let err = rt.load(b"\0asm\x01\0\0\0garbage").unwrap_err();
    assert!(err.to_string().starts_with("invalid Wasm module"), "{err}");
    // An import the runtime does not provide is refused when the module is
    // linked, before anything runs; the runtime is unharmed.
    let alien = rt
        .load(&wat(
            r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
        ))
        .unwrap();
    let err = rt.run(&alien, &spec(&dir, "alien")).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown import: `env::launch_missiles`"),
        "{err}"
    );
    // The runtime still runs other guests.
    let ok = rt.load(&printer("still here", 0)).unwrap();
    assert_eq!(
        rt.run(&ok, &spec(&dir, "ok")).await.unwrap().0,
        Exit::Code(0)
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_runaway_guest_yields_and_can_be_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let spin = rt.load(&wat(SPIN)).unwrap();
    let hello = rt.load(&printer("hi", 0)).unwrap();
    let spin_spec = spec(&dir, "spin");
    // On a single-threaded executor the spinning guest must yield for the
    // other one to finish at all.
    let spinning = rt.run(&spin, &spin_spec);
    let other = async { rt.run(&hello, &spec(&dir, "other")).await.unwrap().0 };
    tokio::pin!(spinning);
    tokio::select! {
        _ = &mut spinning => panic!("the spinning guest cannot finish"),
        exit = other => assert_eq!(exit, Exit::Code(0)),
    }
    // Dropping the run interrupts the guest (a deletion's grace period ends so).
    let interrupted = tokio::time::timeout(Duration::from_millis(100), spinning).await;
    assert!(interrupted.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_throttles_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let mut s = spec(&dir, "limited");
    s.cpu_millis = Some(100);
    // The same work with and without a tenth of a core.
    let counter = rt
        .load(&wat(r#"(module
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (func (export "_start") (local $i i64)
              (loop (local.set $i (i64.add (local.get $i) (i64.const 1)))
                (br_if 0 (i64.lt_u (local.get $i) (i64.const 300000000))))
              (call $exit (i32.const 0))))"#))
        .unwrap();
    let started = std::time::Instant::now();
    let (exit, free) = rt.run(&counter, &spec(&dir, "free")).await.unwrap();
    let free_wall = started.elapsed();
    assert_eq!(exit, Exit::Code(0));
    let started = std::time::Instant::now();
    let (exit, limited) = rt.run(&counter, &s).await.unwrap();
    let limited_wall = started.elapsed();
    assert_eq!(exit, Exit::Code(0));
    // A tenth of a core: the guest runs about 10 ms of every 100 ms. Noise
    // (other load) can only lower this share, never raise it.
    let share = limited.cpu.as_secs_f64() / limited_wall.as_secs_f64();
    assert!(
        share < 0.3,
        "share {share:.2}: limited {limited_wall:?} (cpu {:?}) vs free {free_wall:?} (cpu {:?})",
        limited.cpu,
        free.cpu
    );
}

/// The cache directory's artifact, by extension.
fn cache_file(dir: &tempfile::TempDir, ext: &str) -> std::path::PathBuf {
    let found: Vec<_> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

/// Replaces a file the way a bad disk or a crash would leave it, except by
/// rename: artifacts are mapped into memory, and this module never changes
/// a mapped file under a running guest.
fn replace(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("test-tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn compiled_modules_are_cached_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(&dir);
    let bytes = printer("cached", 0);
    rt.load(&bytes).unwrap();
    assert_eq!(rt.compiled(), 1);
    let artifact = cache_file(&dir, ".cwasm");
    let seal = cache_file(&dir, ".cwasm.sha256");
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        2
    );
    // A second runtime (a restarted agent) loads the artifact instead of compiling.
    let again = runtime(&dir);
    let m = again.load(&bytes).unwrap();
    assert_eq!(again.compiled(), 0);
    assert_eq!(
        again.run(&m, &spec(&dir, "again")).await.unwrap().0,
        Exit::Code(0)
    );

    // A truncated artifact, one with a flipped byte, one without its seal,
    // and garbage with a matching seal are each compiled again, never
    // mapped, and the module runs.
    let good = std::fs::read(&artifact).unwrap();
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let garbage = b"not an artifact".to_vec();
    let garbage_seal = {
        use std::fmt::Write;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&garbage);
        digest.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let damage: [Damage; 4] = [
        (
            "truncated",
            Box::new(|| replace(&artifact, &good[..good.len() / 3])),
        ),
        ("flipped", Box::new(|| replace(&artifact, &flipped))),
        (
            "unsealed",
            Box::new(|| std::fs::remove_file(&seal).unwrap()),
        ),
        (
            "sealed garbage",
            Box::new(|| {
                replace(&artifact, &garbage);
                replace(&seal, garbage_seal.as_bytes());
            }),
        ),
    ];
    for (i, (what, damage)) in damage.iter().enumerate() {
        damage();
        let fresh = runtime(&dir);
        let m = fresh.load(&bytes).unwrap();
        assert_eq!(fresh.compiled(), 1, "{what}: compiled again");
        assert_eq!(
            fresh
                .run(&m, &spec(&dir, &format!("fixed{i}")))
                .await
                .unwrap()
                .0,
            Exit::Code(0),
            "{what}"
        );
        assert_eq!(std::fs::read(&artifact).unwrap(), good, "{what}: repaired");
    }
}

/// The cold path: many pods of a module never seen before ask for it at
/// once. One compiles; the others wait and load what it wrote; no caller
/// ever sees a partly written artifact.
#[test]
fn concurrent_loads_of_a_new_module_compile_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = std::sync::Arc::new(runtime(&dir));
    let bytes = printer("cold", 0);
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (rt, bytes) = (rt.clone(), bytes.clone());
            std::thread::spawn(move || rt.load(&bytes).map(drop))
        })
        .collect();
    for c in callers {
        c.join().unwrap().unwrap();
    }
    assert_eq!(rt.compiled(), 1);
    // Nothing but the artifact and its seal is left behind.
    assert_eq!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count(),
        2
    );
}
