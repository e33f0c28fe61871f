//! The prima paper testbed (shared/design/halda/paper-testbed.json) as a
//! fixture: shipped mode must reproduce the README's plan, optimal mode must
//! beat it. Run with `--nocapture` to see both plans.

use halda::{
    plan, Assignment, ClusterFile, Evaluation, MemorySet, Mode, Objective, Options, PaperTestbed,
    Plan,
};

fn fixture() -> ClusterFile {
    let text = include_str!("data/paper-testbed.json");
    PaperTestbed::from_json(text)
        .and_then(|t| t.into_cluster())
        .expect("fixture loads")
}

fn run(file: &ClusterFile, opts: &Options) -> Plan {
    let p = plan(&file.model, &file.devices, file.n_ctx, opts).expect("plan");
    eprintln!("{p}");
    p
}

fn eval(file: &ClusterFile, a: &Assignment) -> Evaluation {
    halda::evaluate(&file.model, &file.devices, file.n_ctx, &file.options, a).expect("evaluates")
}

fn check_invariants(file: &ClusterFile, p: &Plan) {
    let l = file.model.n_layers;
    assert_eq!(
        p.k * p.devices.iter().map(|d| d.window).sum::<u32>(),
        l,
        "L = k·W"
    );
    for d in &p.devices {
        assert!(d.gpu_layers <= d.window);
        assert!(
            d.memory.vram_used_bytes <= d.memory.vram_budget_bytes + 1.0 || d.gpu_layers == 0,
            "{}: VRAM",
            d.name
        );
        assert!(
            d.memory.ram_anonymous_bytes <= d.memory.ram_budget_bytes + 1.0,
            "{}: anonymous RAM",
            d.name
        );
    }
}

/// The plan the halda README reports for the shipped algorithm.
#[test]
fn shipped_mode_reproduces_the_readme_plan() {
    let file = fixture();
    let opts = Options {
        mode: Mode::Shipped,
        ..file.options.clone()
    };
    let p = run(&file, &opts);
    let w: Vec<u32> = p.devices.iter().map(|d| d.window).collect();
    let n: Vec<u32> = p.devices.iter().map(|d| d.gpu_layers).collect();
    let sets: Vec<_> = p.devices.iter().map(|d| d.set.unwrap()).collect();
    assert_eq!(p.k, 1);
    assert_eq!(w, vec![8, 20, 38, 14]);
    assert_eq!(n, vec![8, 13, 19, 0]);
    assert_eq!(
        sets,
        vec![MemorySet::M2, MemorySet::M4, MemorySet::M4, MemorySet::M3]
    );
    assert!(
        (p.shipped.total_ms - 12_625.0).abs() < 1.0,
        "shipped TPOT {}",
        p.shipped.total_ms
    );
    assert_eq!(p.tpot_ms, p.shipped.total_ms);
    check_invariants(&file, &p);
}

/// README point 1: the shipped model's own optimum is about 2,566 ms
/// (2,566.32 ms exactly) with w = [7, 21, 49, 3], n = [7, 13, 19, 0].
#[test]
fn optimal_with_shipped_objective_finds_the_shipped_models_optimum() {
    let file = fixture();
    let opts = Options {
        objective: Objective::Shipped,
        ..file.options.clone()
    };
    let p = run(&file, &opts);
    let w: Vec<u32> = p.devices.iter().map(|d| d.window).collect();
    let n: Vec<u32> = p.devices.iter().map(|d| d.gpu_layers).collect();
    assert_eq!((p.k, w, n), (1, vec![7, 21, 49, 3], vec![7, 13, 19, 0]));
    assert!(p.shipped.total_ms <= 2_566.32, "{}", p.shipped.total_ms);
    assert!(p.shipped.total_ms > 2_566.0, "{}", p.shipped.total_ms);
    check_invariants(&file, &p);
}

/// The default optimal mode (ring model) against the shipped plan.
#[test]
fn optimal_mode_beats_shipped_on_the_testbed() {
    let file = fixture();
    let shipped = run(
        &file,
        &Options {
            mode: Mode::Shipped,
            ..file.options.clone()
        },
    );
    let best_shipped_model = run(
        &file,
        &Options {
            objective: Objective::Shipped,
            ..file.options.clone()
        },
    );
    let opt = run(&file, &file.options);
    check_invariants(&file, &opt);
    let opt_ring = opt.ring_tpot_ms();
    eprintln!(
        "shipped plan:  shipped model {:.1} ms, ring model {:.1} ms",
        shipped.shipped_tpot_ms(),
        shipped.ring_tpot_ms()
    );
    eprintln!(
        "shipped-model optimum: shipped model {:.1} ms, ring model {:.1} ms",
        best_shipped_model.shipped_tpot_ms(),
        best_shipped_model.ring_tpot_ms()
    );
    eprintln!(
        "optimal plan:  shipped model {:.1} ms, ring model {:.1} ms",
        opt.shipped_tpot_ms(),
        opt_ring
    );
    // The ring model credits prefetching the next window while the others
    // compute, so the optimum uses k > 1 (k = 5 here: D3's re-reads hide
    // behind D1, D2 and D4's windows).
    assert!(opt.k > 1, "k = {}", opt.k);
    assert!(opt.ring_model.as_ref().unwrap().overlap_credit_ms > 0.0);
    // Under its own model the optimal plan is below the shipped model's best
    // figure (2,566 ms) and below the ring TPOT of every other plan here.
    assert!(opt_ring < 2_566.0, "{opt_ring}");
    assert!(opt_ring <= shipped.ring_tpot_ms());
    assert!(opt_ring <= best_shipped_model.ring_tpot_ms());
    // The shipped model has no overlap credit, so it scores this k = 5 plan
    // far above its own k = 1 optimum: the acceptance bar "<= 2,566 ms under
    // the shipped model" is met by the shipped-objective optimum (previous
    // test), not by the ring-model optimum.
    assert!(opt.shipped_tpot_ms() > best_shipped_model.shipped_tpot_ms());
    assert!(opt.shipped_tpot_ms() < shipped.shipped_tpot_ms());
    // Re-evaluating the returned assignment gives the same numbers.
    let e = eval(&file, &opt.assignment());
    assert!((e.ring.total_ms - opt_ring).abs() < 1e-6);
}

#[test]
fn forced_k_that_cannot_be_held_is_a_clear_error() {
    let file = fixture();
    let opts = Options {
        mode: Mode::Shipped,
        k: Some(40),
        ..file.options.clone()
    };
    let err = plan(&file.model, &file.devices, file.n_ctx, &opts).unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains("k = 40") && msg.contains("W = L/k = 2"),
        "{msg}"
    );
    let opts = Options {
        k: Some(40),
        device_selection: false,
        ..file.options.clone()
    };
    let msg = plan(&file.model, &file.devices, file.n_ctx, &opts)
        .unwrap_err()
        .to_string();
    eprintln!("{msg}");
    assert!(msg.contains("k = 40"), "{msg}");
    // With device selection the optimal mode still finds a plan for k = 40.
    let opts = Options {
        k: Some(40),
        ..file.options.clone()
    };
    let p = plan(&file.model, &file.devices, file.n_ctx, &opts).expect("plan with two devices");
    assert_eq!(p.k, 40);
    assert!(p.devices.iter().filter(|d| d.window > 0).count() <= 2);
    // k = 3 does not divide 80.
    let opts = Options {
        k: Some(3),
        ..file.options.clone()
    };
    let msg = plan(&file.model, &file.devices, file.n_ctx, &opts)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("k = 3") && msg.contains("L = 80"), "{msg}");
}

/// The converted fixture survives the `primad plan --devices FILE.json`
/// format (ClusterFile) unchanged.
#[test]
fn fixture_converts_to_a_cluster_file() {
    let file = fixture();
    assert_eq!(file.devices.len(), 4);
    assert_eq!(file.devices[0].name, "D1-mac-m1");
    assert!(file.devices[0].is_metal_shared());
    assert_eq!(file.model.kv_bytes_per_token, 4096);
    let text = serde_json::to_string_pretty(&file).unwrap();
    let again = ClusterFile::from_json(&text).unwrap();
    assert_eq!(again, file);
    let p = halda::plan_cluster(&again).unwrap();
    assert_eq!(p.k, 5);
}
