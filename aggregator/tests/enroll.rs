//! Enrollment (issue #27): labs make their own keys (`fedclient enroll`), the center
//! provisions from their public requests alone. Real files, real crypto: no lab secret
//! reaches the center's directory, a tampered request is refused naming its file and the
//! problem, and the kits pin the fingerprint of the plan the center wrote.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedaggregator::AggregatorConfig;
use fedaggregator::provision::{self, ProvisionError, ProvisionOptions, Provisioned};
use fedclient::enroll::{EnrollOptions, Enrolled, enroll};
use fedcore::secagg::crypto::Identity;
use mekong_proto::enroll::{EnrollRequest, RequestError, RequestProblem};
use mekong_proto::tls::ParticipantKit;

const LABS: [(&str, &str); 3] = [("lab-lo", "lo"), ("lab-km", "km"), ("lab-th", "th")];

fn enroll_labs(labs: &Path) -> Vec<Enrolled> {
    LABS.iter()
        .map(|(name, language)| {
            enroll(&EnrollOptions {
                name: name.to_string(),
                language: language.to_string(),
                out: labs.join(name),
            })
            .unwrap()
        })
        .collect()
}

fn options(out: &Path, requests: Vec<PathBuf>) -> ProvisionOptions {
    ProvisionOptions {
        out: out.to_path_buf(),
        federation: "enroll".into(),
        aggregator_address: "localhost:50051".into(),
        extra_sans: vec!["127.0.0.1".into()],
        requests,
        plan: None,
        validity_days: 30,
        ca_validity_days: 365,
        share_metrics: Vec::new(),
    }
}

/// Every file under `dir`, recursively, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every form of a lab's secrets that could leak: the identity seed (hex either case, raw),
/// the TLS key's PEM, its base64 body (whole and line by line), its DER and the P-256
/// private scalar inside it (raw and hex).
fn secret_forms(lab: &Enrolled) -> Vec<(String, Vec<u8>)> {
    let seed_hex = std::fs::read_to_string(&lab.identity)
        .unwrap()
        .trim()
        .to_string();
    let seed = hex::decode(&seed_hex).unwrap();
    let pem = std::fs::read_to_string(&lab.tls_key).unwrap();
    let body_lines: Vec<&str> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .secret_der()
            .to_vec()
    };
    // ECPrivateKey inside PKCS#8: version 1 (02 01 01), then the scalar (04 20 <32 bytes>).
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("a P-256 PKCS#8 key");
    let scalar = der[at + 5..at + 37].to_vec();
    let mut forms = vec![
        ("identity seed hex".into(), seed_hex.clone().into_bytes()),
        (
            "identity seed HEX".into(),
            seed_hex.to_uppercase().into_bytes(),
        ),
        ("identity seed bytes".into(), seed),
        ("TLS key PEM".into(), pem.clone().into_bytes()),
        ("TLS key base64".into(), body_lines.concat().into_bytes()),
        ("TLS key DER".into(), der),
        ("TLS key scalar".into(), scalar.clone()),
        (
            "TLS key scalar hex".into(),
            hex::encode(&scalar).into_bytes(),
        ),
    ];
    for (i, line) in body_lines.iter().enumerate() {
        if line.len() >= 32 {
            forms.push((format!("TLS key base64 line {i}"), line.as_bytes().to_vec()));
        }
    }
    forms
}

#[test]
fn the_center_never_holds_a_lab_secret() {
    let labs_dir = tempfile::tempdir().unwrap();
    let center = tempfile::tempdir().unwrap();
    let labs = enroll_labs(labs_dir.path());
    let out = center.path().join("fed");
    let made: Provisioned = provision::provision(&options(
        &out,
        labs.iter().map(|l| l.request.clone()).collect(),
    ))
    .unwrap();
    assert_eq!(made.kits.len(), LABS.len());

    // Whatever the center wrote (its own files and every kit), and the requests that
    // travelled to it.
    let mut scanned = files(center.path());
    scanned.extend(
        labs.iter()
            .map(|l| (l.request.clone(), std::fs::read(&l.request).unwrap())),
    );
    assert!(scanned.len() >= 8 + 3 * LABS.len(), "{}", scanned.len());
    for lab in &labs {
        for (what, secret) in secret_forms(lab) {
            for (path, bytes) in &scanned {
                assert!(
                    !contains(bytes, &secret),
                    "{}: holds {what} of {}",
                    path.display(),
                    lab.dir.display()
                );
            }
        }
    }
    // The center's own keys are the only private keys in its directory.
    for (path, bytes) in &scanned {
        let own = [out.join("ca.key"), out.join("server.key")];
        if !own.contains(path) {
            assert!(
                !contains(bytes, b"PRIVATE KEY"),
                "{}: holds a private key",
                path.display()
            );
        }
    }

    // The labs install their kits beside their keys and connect with them.
    for (lab, kit) in labs.iter().zip(&made.kits) {
        let installed = fedclient::enroll::install_kit(kit, &lab.dir).unwrap();
        let k = ParticipantKit::load(&installed).unwrap();
        k.client_config()
            .expect("the kit works with the lab's own key");
        assert_eq!(k.private_key, lab.tls_key);
        assert_eq!(k.identity, lab.identity);
    }
    // A kit issued for another lab's request does not install in this lab's directory.
    let stray = tempfile::tempdir().unwrap();
    let other = enroll(&EnrollOptions {
        name: "lab-lo".into(),
        language: "lo".into(),
        out: stray.path().join("lab-lo"),
    })
    .unwrap();
    let err = fedclient::enroll::install_kit(&made.kits[0], &other.dir).unwrap_err();
    assert!(
        err.to_string().contains("another enrollment request"),
        "{err}"
    );
    assert!(
        !other.dir.join("participant.toml").exists(),
        "a refused kit installs nothing"
    );
}

/// Base64 (standard, padded) of `bytes`, in 64-character PEM lines.
fn pem(label: &str, bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read(path: &Path) -> EnrollRequest {
    EnrollRequest::from_toml(&std::fs::read_to_string(path).unwrap(), path).unwrap()
}

fn csr_der(request: &EnrollRequest) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(request.csr.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn fresh_identity() -> Identity {
    Identity::from_seed(rand::random())
}

/// Whether a refusal is the one a case expects.
type Expected = fn(&RequestProblem) -> bool;

#[test]
fn tampered_and_duplicate_requests_are_refused_naming_the_file() {
    let labs_dir = tempfile::tempdir().unwrap();
    let labs = enroll_labs(labs_dir.path());
    let scratch = tempfile::tempdir().unwrap();
    let a = read(&labs[0].request);
    let b = read(&labs[1].request);
    let seed: [u8; 32] = hex::decode(std::fs::read_to_string(&labs[0].identity).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let identity_a = Identity::from_seed(seed);

    let mut bad_csr_signature = csr_der(&a);
    *bad_csr_signature.last_mut().unwrap() ^= 1;
    let cases: Vec<(&str, EnrollRequest, Expected)> = vec![
        (
            "changed name",
            EnrollRequest {
                name: "lab-xx".into(),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::BadSignature),
        ),
        (
            "changed language",
            EnrollRequest {
                language: "vi".into(),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::BadSignature),
        ),
        (
            "changed identity key",
            EnrollRequest {
                identity_public_key: b.identity_public_key.clone(),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::BadSignature),
        ),
        (
            "changed CSR",
            EnrollRequest {
                csr: b.csr.clone(),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::BadSignature),
        ),
        (
            "bad signature",
            EnrollRequest {
                signature: {
                    let mut s = a.signature.clone().into_bytes();
                    s[10] = if s[10] == b'0' { b'1' } else { b'0' };
                    String::from_utf8(s).unwrap()
                },
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::BadSignature),
        ),
        (
            "truncated signature",
            EnrollRequest {
                signature: a.signature[..100].into(),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::SignatureMalformed),
        ),
        (
            "invalid name",
            EnrollRequest {
                name: "lab lo".into(),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::Name(_)),
        ),
        (
            "not an identity key",
            EnrollRequest {
                identity_public_key: "00".repeat(31),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::IdentityKey(_)),
        ),
        (
            "a certificate for a CSR",
            EnrollRequest {
                csr: pem("CERTIFICATE", &csr_der(&a)),
                ..a.clone()
            },
            |p| matches!(p, RequestProblem::CsrPem(_)),
        ),
        (
            "CSR unparsable (properly signed by its identity)",
            EnrollRequest::sign(
                &fresh_identity(),
                "lab-xx",
                "lo",
                &pem("CERTIFICATE REQUEST", &[0x30, 0x03, 0x02, 0x01, 0x00]),
            )
            .unwrap(),
            |p| matches!(p, RequestProblem::CsrUnparsable(_)),
        ),
        (
            "CSR signature invalid (properly signed by its identity)",
            EnrollRequest::sign(
                &fresh_identity(),
                "lab-xx",
                "lo",
                &pem("CERTIFICATE REQUEST", &bad_csr_signature),
            )
            .unwrap(),
            |p| matches!(p, RequestProblem::CsrSignature),
        ),
        (
            "duplicate name (a second enrollment of lab-lo)",
            {
                let again = enroll(&EnrollOptions {
                    name: "lab-lo".into(),
                    language: "lo".into(),
                    out: scratch.path().join("again"),
                })
                .unwrap();
                read(&again.request)
            },
            |p| matches!(p, RequestProblem::DuplicateName { .. }),
        ),
        (
            "duplicate identity key (lab-lo's identity under another name)",
            {
                let key = rcgen::KeyPair::generate().unwrap();
                let csr = rcgen::CertificateParams::default()
                    .serialize_request(&key)
                    .unwrap()
                    .pem()
                    .unwrap();
                EnrollRequest::sign(&identity_a, "lab-xx", "lo", &csr).unwrap()
            },
            |p| matches!(p, RequestProblem::DuplicateIdentity { .. }),
        ),
        (
            "duplicate TLS key (lab-lo's CSR under another identity)",
            EnrollRequest::sign(&fresh_identity(), "lab-xx", "lo", &a.csr).unwrap(),
            |p| matches!(p, RequestProblem::DuplicateTlsKey { .. }),
        ),
    ];
    for (i, (what, request, expected)) in cases.into_iter().enumerate() {
        let file = scratch.path().join(format!("request-{i}.toml"));
        std::fs::write(&file, request.to_toml()).unwrap();
        // The good labs first, so the duplicates have something to collide with.
        let requests = vec![
            labs[0].request.clone(),
            labs[1].request.clone(),
            file.clone(),
        ];
        let out = scratch.path().join(format!("fed-{i}"));
        let err = provision::provision(&options(&out, requests)).unwrap_err();
        let shown = err.to_string();
        eprintln!("{what}: {shown}");
        match &err {
            ProvisionError::Request(RequestError { path, problem }) => {
                assert_eq!(path, &file.display().to_string(), "{what}");
                assert!(expected(problem), "{what}: {problem:?}");
            }
            other => panic!("{what}: {other}"),
        }
        assert!(
            shown.contains(&file.display().to_string()),
            "{what}: {shown}"
        );
        assert!(!out.exists(), "{what}: nothing may be written");
    }
    // The problems are named in words.
    let tampered = scratch.path().join("request-0.toml");
    let err =
        provision::provision(&options(&scratch.path().join("f"), vec![tampered])).unwrap_err();
    assert!(err.to_string().contains("bad signature"), "{err}");
    let err = provision::provision(&options(&scratch.path().join("f"), vec![])).unwrap_err();
    assert!(matches!(err, ProvisionError::NoRequests), "{err}");
}

fn fedaggregator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedaggregator"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("fedaggregator runs")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The kits pin the plan in the aggregator.toml provisioning wrote: the operator's `--plan`
/// when given, and `check-config` prints the same fingerprint. A plan that does not
/// validate is reported loudly, and its kits still pin what was written.
#[test]
fn provision_cli_pins_the_written_plan_in_every_kit() {
    let labs_dir = tempfile::tempdir().unwrap();
    let labs = enroll_labs(labs_dir.path());
    let requests = tempfile::tempdir().unwrap();
    for lab in &labs {
        let name = lab.dir.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(&lab.request, requests.path().join(format!("{name}.toml"))).unwrap();
    }
    let center = tempfile::tempdir().unwrap();
    // The example plan's [plan] sections, with more rounds.
    let example = AggregatorConfig::example();
    let mut plan = example.plan.clone();
    plan.roster.clear();
    plan.rounds.rounds = 7;
    let plan_toml = |plan: &fedcore::FederationPlan| {
        let mut table = toml::Table::new();
        let mut value = toml::Value::try_from(plan).unwrap();
        value.as_table_mut().unwrap().remove("roster");
        value.as_table_mut().unwrap().remove("federation");
        table.insert("plan".into(), value);
        toml::to_string(&table).unwrap()
    };
    let plan_file = center.path().join("plan.toml");
    std::fs::write(&plan_file, plan_toml(&plan)).unwrap();

    let fed = center.path().join("fed");
    let args = |fed: &Path, plan: &Path| {
        vec![
            "provision".to_string(),
            "--out".into(),
            fed.display().to_string(),
            "--federation".into(),
            "enroll".into(),
            "--aggregator-address".into(),
            "localhost:50051".into(),
            "--requests".into(),
            requests.path().display().to_string(),
            "--plan".into(),
            plan.display().to_string(),
        ]
    };
    let run = |fed: &Path, plan: &Path| {
        let a = args(fed, plan);
        fedaggregator(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&fed, &plan_file);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("WARNING"), "{}", text(&out));
    let config = AggregatorConfig::load(&fed.join("aggregator.toml")).unwrap();
    assert_eq!(config.plan.rounds.rounds, 7);
    // Roster in file-name order of the requests directory.
    let mut names: Vec<&str> = LABS.iter().map(|(n, _)| *n).collect();
    names.sort();
    let roster: Vec<&str> = config.plan.roster.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(roster, names);
    let fingerprint = config.plan.fingerprint();
    assert!(text(&out).contains(&fingerprint), "{}", text(&out));
    for name in &names {
        let kit = ParticipantKit::load(&fed.join(provision::KITS_DIR).join(name)).unwrap();
        assert_eq!(
            kit.policy.plan_sha256.as_deref(),
            Some(fingerprint.as_str())
        );
    }
    let check = fedaggregator(&[
        "check-config",
        "-c",
        &fed.join("aggregator.toml").display().to_string(),
    ]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains(&format!("plan sha256: {fingerprint}")),
        "{}",
        text(&check)
    );

    // A plan that does not validate with this roster: written, said loudly, pinned as is.
    plan.rounds.participants = 5;
    std::fs::write(&plan_file, plan_toml(&plan)).unwrap();
    let fed2 = center.path().join("fed2");
    let out = run(&fed2, &plan_file);
    assert!(out.status.success(), "{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stderr);
    assert!(shown.contains("WARNING"), "{shown}");
    assert!(shown.contains("does not validate"), "{shown}");
    assert!(shown.contains("rounds.participants"), "{shown}");
    let written: AggregatorConfig =
        toml::from_str(&std::fs::read_to_string(fed2.join("aggregator.toml")).unwrap()).unwrap();
    let kit = ParticipantKit::load(&fed2.join(provision::KITS_DIR).join("lab-km")).unwrap();
    assert_eq!(
        kit.policy.plan_sha256,
        Some(written.plan.fingerprint()),
        "the kit pins the plan as written"
    );

    // --plan refuses a roster, another federation and sections it does not read.
    for (bad, needle) in [
        ("[plan]\nfederation = \"other\"\n", "federation \"other\""),
        (
            "[[plan.roster]]\nname = \"x\"\npublic_key = \"00\"\n",
            "plan.roster",
        ),
        ("[server]\nlisten = \"0.0.0.0:1\"\n", "[server]"),
    ] {
        std::fs::write(&plan_file, bad).unwrap();
        let out = run(&center.path().join("fed3"), &plan_file);
        assert!(!out.status.success(), "{bad}: {}", text(&out));
        assert!(text(&out).contains(needle), "{bad}: {}", text(&out));
        assert!(!center.path().join("fed3").exists());
    }
}
