//! `cargo xtask`: the project's tasks, so that anyone runs exactly what CI runs.

mod claims;
mod demo;
mod manifests;
mod setup;
mod task;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "skiff project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what a fresh machine lacks: Debian packages, the eBPF toolchain, test clients.
    Setup,
    /// Build the router with its embedded eBPF programs.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Formatting and clippy with warnings denied; the Kubernetes manifests validated.
    Lint,
    /// Write the CRDs generated from the router's resource types to deploy/kubernetes/crds/.
    Crds,
    /// Everything CI checks: lint, unit and integration tests, kernel tests.
    Test,
    /// Only the privileged tests on the real kernel (needs root).
    KernelTest {
        /// Extra arguments for the test binaries (a test name filter, --nocapture).
        args: Vec<String>,
    },
    /// The kernel tests inside QEMU guests on Debian's kernels (fetched and cached), with
    /// the host's root file system shared read-only into each guest.
    VmTest {
        /// Which kernel: 5.10 (Debian 11), 6.1 (Debian 12), 6.12 (Debian 13) or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Boot with lockdown=confidentiality on the kernel command line.
        #[arg(long)]
        lockdown: bool,
        /// Only this kernel-tests binary (accel, isolation, ...); repeat for more.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// What CI runs: the matrix `cargo xtask test` boots (ignores the options above).
        #[arg(long)]
        ci: bool,
        /// Arguments for the test binaries (a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Show skiff working on this machine.
    Demo,
    /// A mesh of many routers, each in its own network namespace: how long routes take to
    /// converge after a router dies and a link is cut, and each router's RSS (needs root).
    Scale {
        /// Sites in the mesh (6 to 250).
        #[arg(long, default_value_t = 30)]
        sites: u8,
    },
    /// Benchmarks: skiff against direct loopback and other relays, as ratios (needs root).
    Bench {
        /// Arguments for the bench binary: scenario names, --quick, --runs N, --seconds S, --out DIR.
        /// `--micro` alone runs the Criterion micro-benchmarks (frame codec, TLS records) instead.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Build { release } => {
            setup::ensure()?;
            task::build(release)
        }
        Command::Lint => {
            setup::ensure()?;
            task::lint()
        }
        Command::Crds => {
            setup::ensure()?;
            manifests::write_crds()
        }
        Command::Test => {
            setup::ensure()?;
            task::lint()?;
            let mut tally = task::Tally::default();
            let result = task::unit_tests(&mut tally)
                .and_then(|()| task::kernel_tests(&[], &mut tally))
                // The kernel tests again inside VMs, on the kernels gateways run.
                .and_then(|()| vm::run(&vm::ci_runs(), &mut tally));
            tally.print();
            result
        }
        Command::KernelTest { args } => {
            setup::ensure()?;
            let mut tally = task::Tally::default();
            let result = task::kernel_tests(&args, &mut tally);
            tally.print();
            result
        }
        Command::Scale { sites } => {
            setup::ensure()?;
            anyhow::ensure!(task::is_root(), "the mesh needs root (network namespaces)");
            let mut tally = task::Tally::default();
            let args = [
                "--ignored",
                "--exact",
                "a_mesh_converges_around_a_dead_router_and_a_cut_link",
                "--nocapture",
            ]
            .map(String::from);
            // SAFETY (edition 2024 marks this unsafe): no other thread runs yet.
            unsafe { std::env::set_var("SKIFF_SITES", sites.to_string()) };
            let result = task::kernel_tests(&args, &mut tally);
            tally.print();
            result
        }
        Command::VmTest {
            kernel,
            lockdown,
            tests,
            ci,
            args,
        } => {
            setup::ensure()?;
            let runs = if ci {
                vm::ci_runs()
            } else {
                vm::releases(&kernel)?
                    .into_iter()
                    .map(|release| vm::Run {
                        release,
                        lockdown,
                        tests: tests.clone(),
                        args: args.clone(),
                        skip_known: false,
                    })
                    .collect()
            };
            let mut tally = task::Tally::default();
            let result = vm::run(&runs, &mut tally);
            tally.print();
            result
        }
        Command::Demo => {
            setup::ensure()?;
            demo::run()
        }
        Command::Bench { args } => {
            setup::ensure()?;
            task::bench(&args)
        }
    }
}
