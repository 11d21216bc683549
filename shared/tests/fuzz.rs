//! Property-based fuzzing of everything a user or a repository hands the domain:
//! manifests (YAML and JSON), `fleet.yaml`/`flotilla.yaml`, declarative objects,
//! label selectors and labels, join tokens, durations, names, webhook payloads and
//! headers. Arbitrary input (raw bytes, and valid documents with random damage)
//! must never panic, and must fail with the documented error: naming the file for
//! a bundle, the selector for a selector, and so on. `make test` runs a few cases;
//! `make fuzz` many (`FLOTILLA_FUZZ_CASES`). Failures proptest finds are kept in
//! `proptest-regressions/` and replayed first.

use std::collections::BTreeMap;

use flotilla_shared::bundle::{parse_manifests, render_plain};
use flotilla_shared::error::Error;
use flotilla_shared::fleetyaml::parse_spec;
use flotilla_shared::labels::{parse_labels, validate_key, validate_value, LabelEdit};
use flotilla_shared::objects::{parse_duration, parse_objects, validate_name, GitSourceSpec};
use flotilla_shared::selector::LabelSelector;
use flotilla_shared::token::JoinToken;
use flotilla_shared::webhook::{
    concerns, hmac_sha256, normalize_repo_url, parse_push, verify, HookError, Provider,
};
use proptest::prelude::*;

/// Cases per property: few in `make test`, `FLOTILLA_FUZZ_CASES` in `make fuzz`.
fn config() -> ProptestConfig {
    let cases = std::env::var("FLOTILLA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Valid documents to damage: a manifest stream, a fleet.yaml, objects.
const MANIFESTS: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: x\n  labels: {app: a}\ndata:\n  k: \"v\"\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: app\n        image: registry.example/web:1\n---\n# comment only\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Secret\n  metadata: {name: s}\n  stringData: {a: b}\n";

const FLEET_YAML: &str = "defaultNamespace: apps\nnamespace: forced\nlabels: {tier: web}\ndependsOn:\n- name: base\n- selector:\n    matchLabels: {tier: db}\nhelm:\n  chart: ./chart\n  releaseName: web\n  values:\n    replicas: 2\n  valuesFiles: [values-prod.yaml]\nkustomize:\n  dir: overlays/prod\ndiff:\n  comparePatches:\n  - apiVersion: apps/v1\n    kind: Deployment\n    name: web\n    jsonPointers: [/spec/replicas]\ndrift:\n  mode: report\ntargetCustomizations:\n- name: prod\n  clusterSelector:\n    matchLabels: {env: prod}\n    matchExpressions:\n    - {key: region, operator: In, values: [eu, us]}\n  clusterGroup: edge\n  helm:\n    values: {replicas: 5}\n  yaml:\n    overlays: [prod]\n";

const KUSTOMIZATION: &str = "resources: [cm.yaml, ../base]\nnamePrefix: p-\npatches:\n- path: patch.yaml\n  target: {kind: ConfigMap}\nconfigMapGenerator:\n- name: g\n  files: [k=cm.yaml]\n  envs: [a.env]\ntransformers: [t.yaml]\n";

const OBJECTS: &str = "apiVersion: flotilla.io/v1alpha1\nkind: GitSource\nmetadata: {name: apps}\nspec:\n  repo: https://git.example/apps.git\n  branch: main\n  paths: [\"apps/*\"]\n  pollInterval: 30s\n  targets:\n  - clusterSelector: {matchLabels: {env: prod}}\n---\napiVersion: flotilla.io/v1alpha1\nkind: ClusterGroup\nmetadata: {name: edge}\nspec:\n  selector:\n    matchExpressions:\n    - {key: tier, operator: NotIn, values: [core]}\n";

const GITHUB_PUSH: &str = r#"{"ref":"refs/heads/main","before":"0","after":"1","repository":{"clone_url":"https://github.com/acme/apps.git","ssh_url":"git@github.com:acme/apps.git","html_url":"https://github.com/acme/apps","git_url":"git://github.com/acme/apps.git"}}"#;

const GITLAB_PUSH: &str = r#"{"object_kind":"push","ref":"refs/tags/v1","project":{"git_http_url":"https://gitlab.example/acme/apps.git","git_ssh_url":"git@gitlab.example:acme/apps.git","web_url":"https://gitlab.example/acme/apps"}}"#;

/// Damage to a valid document: bytes replaced, inserted, removed, or a slice
/// repeated, at random places.
#[derive(Debug, Clone)]
enum Damage {
    Replace(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Repeat(usize, usize, u8),
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    let interesting = prop::sample::select(vec![
        b':', b'-', b' ', b'\n', b'\t', b'{', b'}', b'[', b']', b'"', b'\'', b'&', b'*', b'!',
        b'|', b'>', b'#', b'%', b'@', b'`', b'\\', b',', b'?', 0u8, 0xff, b'0', b'.',
    ]);
    let one = prop_oneof![
        (
            any::<usize>(),
            prop_oneof![any::<u8>(), interesting.clone()]
        )
            .prop_map(|(at, b)| Damage::Replace(at, b)),
        (
            any::<usize>(),
            prop::collection::vec(prop_oneof![any::<u8>(), interesting], 1..12)
        )
            .prop_map(|(at, b)| Damage::Insert(at, b)),
        (any::<usize>(), 1usize..40).prop_map(|(at, n)| Damage::Remove(at, n)),
        (any::<usize>(), 1usize..60, 1u8..8).prop_map(|(at, n, k)| Damage::Repeat(at, n, k)),
    ];
    prop::collection::vec(one, 1..8)
}

fn damaged(doc: &str, damage: &[Damage]) -> Vec<u8> {
    let mut b = doc.as_bytes().to_vec();
    for d in damage {
        let len = b.len().max(1);
        match d {
            Damage::Replace(at, v) => {
                if !b.is_empty() {
                    let i = at % b.len();
                    b[i] = *v;
                }
            }
            Damage::Insert(at, v) => {
                let i = at % len.min(b.len() + 1);
                b.splice(i..i, v.iter().copied());
            }
            Damage::Remove(at, n) => {
                if !b.is_empty() {
                    let i = at % b.len();
                    let j = (i + n).min(b.len());
                    b.drain(i..j);
                }
            }
            Damage::Repeat(at, n, k) => {
                if !b.is_empty() {
                    let i = at % b.len();
                    let j = (i + n).min(b.len());
                    let slice = b[i..j].to_vec();
                    for _ in 0..*k {
                        b.splice(j..j, slice.iter().copied());
                    }
                }
            }
        }
    }
    b
}

/// Bytes that are either anything, or a damaged copy of `doc`.
fn input(doc: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        damage().prop_map(move |d| damaged(doc, &d)),
    ]
}

/// A render error names a file of the bundle (or a file it looked for).
fn names_a_file(file: &str, files: &BTreeMap<String, Vec<u8>>) -> bool {
    files.contains_key(file)
        || file.ends_with(".yaml")
        || file.ends_with(".yml")
        || file.ends_with(".json")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn manifests_never_panic(yaml in input(MANIFESTS), json in input(r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"k":"v"}}"#)) {
        let files = BTreeMap::from([
            ("app.yaml".to_string(), yaml),
            ("sub/obj.json".to_string(), json),
        ]);
        if let Err(e) = parse_manifests(&files) {
            prop_assert!(files.contains_key(&e.file), "error names no input file: {e}");
            prop_assert!(!e.reason.is_empty());
        }
        match render_plain(&files) {
            Ok(r) => {
                for m in &r.manifests {
                    prop_assert!(files.contains_key(&m.file));
                }
                let _ = r.content_hash();
            }
            Err(e) => prop_assert!(names_a_file(&e.file, &files), "error names no file: {e}"),
        }
    }

    #[test]
    fn fleet_yaml_never_panics(spec in input(FLEET_YAML), name in prop::sample::select(vec!["fleet.yaml", "flotilla.yaml"])) {
        let files = BTreeMap::from([
            (name.to_string(), spec),
            ("cm.yaml".to_string(), MANIFESTS.as_bytes().to_vec()),
        ]);
        match parse_spec(&files) {
            Ok(spec) => {
                let _ = flotilla_shared::fleetyaml::variants(&spec);
            }
            Err(e) => prop_assert!(names_a_file(&e.file, &files), "error names no file: {e}"),
        }
        if let Err(e) = render_plain(&files) {
            prop_assert!(names_a_file(&e.file, &files), "error names no file: {e}");
        }
    }

    #[test]
    fn kustomizations_never_panic_and_name_their_file(k in input(KUSTOMIZATION), t in input("apiVersion: builtin\nkind: LabelTransformer\nmetadata: {name: l}\nlabels: {a: b}\n")) {
        let files = BTreeMap::from([
            ("o/kustomization.yaml".to_string(), k),
            ("o/cm.yaml".to_string(), MANIFESTS.as_bytes().to_vec()),
            ("o/patch.yaml".to_string(), MANIFESTS.as_bytes().to_vec()),
            ("o/a.env".to_string(), b"A=1\n".to_vec()),
            ("o/t.yaml".to_string(), t),
            ("base/kustomization.yaml".to_string(), b"resources: []\n".to_vec()),
        ]);
        if let Err(e) = flotilla_shared::kustomization::check_bundle(&files, &[]) {
            prop_assert!(files.contains_key(&e.file), "error names no file of the bundle: {e}");
        }
    }

    #[test]
    fn no_fleet_yaml_makes_a_helm_flag(spec in input(FLEET_YAML)) {
        let files = BTreeMap::from([
            ("fleet.yaml".to_string(), spec),
            ("Chart.yaml".to_string(), b"name: c\nversion: 0.1.0\n".to_vec()),
            ("chart/Chart.yaml".to_string(), b"name: c\nversion: 0.1.0\n".to_vec()),
            ("values-prod.yaml".to_string(), b"a: 1\n".to_vec()),
            ("overlays/prod/kustomization.yaml".to_string(), b"resources: []\n".to_vec()),
        ]);
        let Ok(spec) = parse_spec(&files) else { return Ok(()) };
        for v in flotilla_shared::fleetyaml::variants(&spec) {
            let Ok(plan) = flotilla_shared::fleetyaml::plan(&spec, &v, &files, "b") else { continue };
            let flotilla_shared::fleetyaml::Renderer::Helm(h) = plan.renderer else { continue };
            let allow = vec!["https://".to_string(), "oci://".to_string()];
            let Ok(args) = h.template_args("/t/b", "/t/v.json", &allow) else { continue };
            let dash = args.iter().position(|a| a == "--").expect("a -- before the positionals");
            prop_assert_eq!(dash, args.len() - 3);
            for a in args[1..dash].iter().filter(|a| *a != "--include-crds") {
                prop_assert!(a.starts_with("--") && a.contains('='), "not a --flag=value: {a:?}");
                let flag = a.split('=').next().unwrap_or_default();
                prop_assert!(
                    ["--namespace", "--repo", "--version", "--kube-version", "--api-versions", "--values"].contains(&flag),
                    "unexpected flag {a:?}"
                );
            }
            for a in &args[dash + 1..] {
                prop_assert!(!a.starts_with('-'), "a positional reads as a flag: {a:?}");
            }
        }
    }

    #[test]
    fn declarative_objects_never_panic(text in input(OBJECTS)) {
        let text = String::from_utf8_lossy(&text).into_owned();
        match parse_objects("fleet/sources.yaml", &text) {
            Ok(objects) => {
                for o in objects {
                    let _ = o.name();
                }
            }
            Err(Error::Object { file, .. }) => prop_assert_eq!(file, "fleet/sources.yaml"),
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
    }

    #[test]
    fn selectors_never_panic_and_round_trip(s in prop_oneof![
        ".{0,80}",
        "[a-z0-9./=!,() -]{0,60}",
        prop::collection::vec(prop::sample::select(vec!["env", "=", "==", "!=", " in ", " notin ", "(", ")", ",", "!", "a", "b.example/c", "-", " ", "x=y"]), 0..12).prop_map(|v| v.concat()),
    ]) {
        match LabelSelector::parse(&s) {
            Ok(sel) => {
                let canonical = sel.to_string();
                let again = LabelSelector::parse(&canonical);
                prop_assert!(again.is_ok(), "canonical form {canonical:?} of {s:?} does not parse: {again:?}");
                let again = again.unwrap_or_default();
                prop_assert_eq!(again.to_string(), canonical);
                let _ = sel.validate();
                let _ = sel.matches(&Default::default());
            }
            Err(Error::Selector { .. }) => {}
            Err(e) => prop_assert!(false, "undocumented error for {s:?}: {e}"),
        }
    }

    #[test]
    fn labels_never_panic(s in ".{0,80}", k in ".{0,300}", v in ".{0,80}") {
        match parse_labels(&s) {
            Ok(labels) => {
                for (k, v) in labels.iter() {
                    prop_assert!(validate_key(k).is_ok() && validate_value(v).is_ok());
                }
            }
            Err(Error::Label { .. }) => {}
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
        let _ = validate_key(&k);
        let _ = validate_value(&v);
        let _ = s.parse::<LabelEdit>();
    }

    #[test]
    fn join_tokens_never_panic(s in prop_oneof![
        ".{0,200}",
        ("[a-z0-9]{0,8}", "[a-z0-9]{0,40}", "[0-9a-f]{0,70}").prop_map(|(a, b, c)| format!("flotilla.{a}.{b}.{c}")),
        "[a-zA-Z0-9.]{0,120}",
    ]) {
        match s.parse::<JoinToken>() {
            Ok(t) => {
                let back: Result<JoinToken, _> = t.to_string().parse();
                prop_assert!(back.is_ok());
                prop_assert!(JoinToken::split_credential(&t.credential()).is_ok());
            }
            Err(Error::Token(_)) => {}
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
        let _ = JoinToken::split_credential(&s);
    }

    #[test]
    fn durations_and_names_never_panic(s in prop_oneof![".{0,40}", "[0-9]{0,25}(ms|s|m|h|d|)", "[a-z0-9-]{0,70}"]) {
        match parse_duration(&s) {
            Ok(_) | Err(Error::Duration { .. }) => {}
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
        match validate_name(&s) {
            Ok(()) | Err(Error::Name { .. }) => {}
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
    }

    #[test]
    fn webhook_payloads_never_panic(
        github in input(GITHUB_PUSH),
        gitlab in input(GITLAB_PUSH),
        event in prop_oneof![Just("push".to_string()), Just("Push Hook".to_string()), Just("Tag Push Hook".to_string()), ".{0,20}"],
        url in ".{0,120}",
    ) {
        for (provider, body) in [(Provider::GitHub, &github), (Provider::GitLab, &gitlab)] {
            match parse_push(provider, &event, body) {
                Ok(push) => {
                    let spec = GitSourceSpec { repo: url.clone(), ..Default::default() };
                    let _ = concerns(&push, &spec);
                }
                Err(HookError::NotPush(_) | HookError::BadPayload(_)) => {}
                Err(e) => prop_assert!(false, "undocumented error: {e}"),
            }
        }
        let _ = normalize_repo_url(&url);
    }

    #[test]
    fn webhook_headers_never_panic(
        body in prop::collection::vec(any::<u8>(), 0..256),
        sig in prop_oneof![".{0,80}", "sha256=[0-9a-f]{0,70}"],
        token in ".{0,40}",
        which in 0u8..4,
        secret in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let header = |name: &str| -> Option<&str> {
            match (which, name) {
                (0 | 2, "x-github-event") => Some("push"),
                (0 | 2, "x-hub-signature-256") => Some(sig.as_str()),
                (1 | 2, "x-gitlab-event") => Some("Push Hook"),
                (1 | 2, "x-gitlab-token") => Some(token.as_str()),
                _ => None,
            }
        };
        let secrets: [&[u8]; 2] = [&secret, b""];
        match verify(header, &body, &secrets).map(|(p, _)| p) {
            Ok(Provider::GitHub) => {
                // Only the right signature passes.
                let want = format!("sha256={}", hex(&hmac_sha256(&secret, &body)));
                prop_assert_eq!(sig.trim().to_lowercase(), want);
            }
            Ok(Provider::GitLab) => prop_assert_eq!(token.as_bytes(), secret.as_slice()),
            Err(HookError::BadSignature | HookError::UnknownProvider) => {}
            Err(e) => prop_assert!(false, "undocumented error: {e}"),
        }
        // An empty secret never authenticates anything.
        prop_assert!(verify(header, &body, &[b""]).is_err());
    }
}

/// Found by `durations_and_names_never_panic`: minutes, hours or days that do not
/// fit in a u64 of seconds overflowed (a panic in debug builds, a wrapped duration
/// in release), and so did a sum of parts.
#[test]
fn huge_durations_are_refused() {
    for s in [
        "307450000000000000m",
        "5124100000000000h",
        "213600000000000d",
        "18446744073709551615s18446744073709551615s",
    ] {
        match parse_duration(s) {
            Err(Error::Duration { reason, .. }) => {
                assert!(reason.contains("too large"), "{s}: {reason}")
            }
            other => panic!("{s}: {other:?}"),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
