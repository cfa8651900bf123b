//! The Guix dialect on the same socket: a client speaking 0x164 the way `guix/store.scm`
//! does (its `SetOptions` layout, inline archives for `AddToStore`, `QueryPathInfo` without
//! the found flag, plain error frames with a status, build traces on stderr, the Guix-only
//! operations).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use kiln_format::{FileIngestionMethod, HashAlgo, StorePath};
use kiln_protocol::ops::AddToStore;
use kiln_protocol::{
    BuildMode, ClientOptions, DerivedPath, Error, Message, OutputSpec, Reply, Request,
};

fn add_text(c: &mut kiln_protocol::Client, name: &str, text: Vec<u8>) -> StorePath {
    match c
        .request(
            &Request::AddTextToStore {
                name: name.into(),
                text,
                refs: BTreeSet::new(),
            },
            None,
            &mut |_| {},
        )
        .unwrap()
    {
        Reply::OptPath(Some(p)) => p,
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_guix_client_builds_with_traces() {
    let d = TestDaemon::start();
    let mut c = d.guix();
    assert!(
        c.daemon_version_string.is_none(),
        "Guix gets no version string"
    );
    let opts = ClientOptions {
        verbosity: 3,
        print_build_trace: true,
        use_substitutes: false,
        overrides: vec![
            ("build-timeout".into(), "60".into()),
            ("multiplexed-build-output".into(), "true".into()),
            ("user-name".into(), "alice".into()),
        ],
        ..Default::default()
    };
    c.request(&Request::SetOptions(opts), None, &mut |_| {})
        .unwrap();
    assert!(matches!(
        c.request(&Request::BuiltinBuilders, None, &mut |_| {}).unwrap(),
        Reply::Strings(s) if s == vec!["download".to_string()]
    ));

    let (name, text) = drv_text(&d, "hello", "echo guix was here; echo hi > $out");
    let drv_path = add_text(&mut c, &name, text);
    let mut said = Vec::new();
    let r = c
        .request(
            &Request::BuildPaths {
                paths: vec![DerivedPath::Built {
                    drv: drv_path.clone(),
                    outputs: OutputSpec::All,
                }],
                mode: BuildMode::Normal,
            },
            None,
            &mut |m| said.push(m),
        )
        .unwrap();
    assert!(matches!(r, Reply::Int(1)));
    let text: String = said
        .iter()
        .map(|m| match m {
            Message::Next(s) => s.clone(),
            m => panic!("Guix clients get no activities: {m:?}"),
        })
        .collect();
    let shown = d.store_dir().display(&drv_path);
    assert!(
        text.contains(&format!("@ build-started {shown} - ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("@ build-succeeded {shown} -")),
        "{text}"
    );
    // Multiplexed output: `@ build-log PID LEN` then the bytes.
    assert!(
        text.contains("@ build-log ") && text.contains("guix was here"),
        "{text}"
    );

    // QueryPathInfo without the found flag.
    let drv_parsed = d.daemon.store().read_derivation(&drv_path).unwrap();
    let out = drv_parsed.output_path("out").unwrap().clone();
    match c
        .request(&Request::QueryPathInfo(out.clone()), None, &mut |_| {})
        .unwrap()
    {
        Reply::PathInfo(Some(i)) => {
            assert_eq!(i.deriver.as_ref(), Some(&drv_path));
            assert_eq!(i.nar_size, 120);
        }
        r => panic!("{r:?}"),
    }
    // An invalid path is an error for Guix (with a status), and the connection goes on.
    let missing = StorePath::from_base_name(&format!("{:032}-gone", 3)).unwrap();
    let e = c
        .request(&Request::QueryPathInfo(missing), None, &mut |_| {})
        .unwrap_err();
    match e {
        Error::Remote(r) => {
            assert!(r.message.contains("is not valid"), "{}", r.message);
            assert_eq!(r.status, 1);
        }
        e => panic!("{e}"),
    }
    assert!(matches!(
        c.request(&Request::IsValidPath(out), None, &mut |_| {})
            .unwrap(),
        Reply::Bool(true)
    ));
}

#[test]
fn guix_adds_archives_inline_and_caches_failures() {
    let d = TestDaemon::with_settings(&[("cache-failures", "true")]);
    let mut c = d.guix();
    c.request(
        &Request::SetOptions(ClientOptions::default()),
        None,
        &mut |_| {},
    )
    .unwrap();
    // Recursive and flat, both with an inline NAR.
    let nar = nar_file(b"hello\n");
    for (method, want) in [
        (FileIngestionMethod::Recursive, "hello.txt"),
        (FileIngestionMethod::Flat, "hello.txt"),
    ] {
        let r = c
            .request(
                &Request::AddToStore(AddToStore::Legacy {
                    name: "hello.txt".into(),
                    method,
                    algo: HashAlgo::Sha256,
                }),
                Some(&mut nar.as_slice()),
                &mut |_| {},
            )
            .unwrap();
        match r {
            Reply::OptPath(Some(p)) => assert_eq!(p.name(), want),
            r => panic!("{r:?}"),
        }
    }
    // A failing build is cached; Guix's own operations list and clear it.
    let (name, text) = drv_text(&d, "broken", "exit 1");
    let drv_path = add_text(&mut c, &name, text);
    let e = c
        .request(
            &Request::BuildPaths {
                paths: vec![DerivedPath::Built {
                    drv: drv_path.clone(),
                    outputs: OutputSpec::All,
                }],
                mode: BuildMode::Normal,
            },
            None,
            &mut |_| {},
        )
        .unwrap_err();
    match e {
        // Guix clients learn the build failure status.
        Error::Remote(r) => assert_eq!(r.status, 100, "{}", r.message),
        e => panic!("{e}"),
    }
    let failed = match c
        .request(&Request::QueryFailedPaths, None, &mut |_| {})
        .unwrap()
    {
        Reply::Paths(s) => s,
        r => panic!("{r:?}"),
    };
    let out = d.daemon.store().read_derivation(&drv_path).unwrap();
    assert_eq!(failed, vec![out.output_path("out").unwrap().clone()]);
    c.request(
        &Request::ClearFailedPaths(failed.into_iter().collect()),
        None,
        &mut |_| {},
    )
    .unwrap();
    assert!(matches!(
        c.request(&Request::QueryFailedPaths, None, &mut |_| {}).unwrap(),
        Reply::Paths(s) if s.is_empty()
    ));
}

#[test]
fn nix_only_operations_are_invalid_for_guix() {
    let d = TestDaemon::start();
    let p = StorePath::from_base_name(&format!("{:032}-x", 1)).unwrap();
    // kiln's own client knows Guix has no op 38 and does not send it.
    let e = d
        .guix()
        .request(&Request::NarFromPath(p.clone()), None, &mut |_| {})
        .unwrap_err();
    assert!(
        e.to_string().contains("has no operation NarFromPath"),
        "{e}"
    );
    // A client that sends it anyway: the daemon refuses it, in Guix's words, and hangs up.
    use std::io::{Read, Write};
    let mut c = d.raw();
    c.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    c.write_all(&u64(0x6e69_7863)).unwrap();
    let mut hello = [0u8; 16];
    c.read_exact(&mut hello).unwrap();
    let path = format!("{}/{}", d.store_dir().as_str(), p.base_name());
    c.write_all(&[u64(0x164), u64(0), u64(0), u64(38), s(path.as_bytes())].concat())
        .unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("invalid operation 38"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "Guix's messages have no colours: {text}"
    );
}
