//! `infra prepare`: fetch and build the test infrastructure into
//! `target/infra`, timing each step. `infra kube-api -- CMD...`: run CMD
//! against a throwaway Kubernetes API server (`KUBECONFIG` and `KUBECTL` set).

use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Throwaway test infrastructure for orders-center")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch Kafka's jars and build etcd, kube-apiserver and kubectl, unless cached.
    Prepare,
    /// Build what a one-node cluster runs besides containerd (etcd, the API
    /// server, kubectl, kubelet, controller-manager, scheduler, kube-proxy),
    /// version-stamped, unless cached under target/infra.
    PrepareNode,
    /// Pack an image without Docker: what a contents file lists (by default
    /// image/contents, the service's, from the release build), as an OCI
    /// image tarball for `ctr images import`.
    Image {
        /// The contents file, relative to the workspace.
        #[arg(long, default_value = "image/contents")]
        contents: std::path::PathBuf,
        /// The image's name.
        #[arg(long, default_value = "orders-center:dev")]
        name: String,
        /// Where to write the tarball.
        #[arg(long, default_value = "target/images/orders-center.oci.tar")]
        out: std::path::PathBuf,
    },
    /// Start PostgreSQL and RabbitMQ on loopback and on ADDRESS (for the
    /// pods of a one-node cluster on this machine), run a command with
    /// `PG_PORT` and `AMQP_PORT` set, stop them.
    HostServices {
        /// The address pods reach this machine on.
        #[arg(long)]
        address: String,
        /// Networks PostgreSQL trusts besides loopback (the pod CIDR).
        #[arg(long)]
        trust: Vec<String>,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Start etcd and kube-apiserver, run a command against them, stop them.
    KubeApi {
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("infra: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> ephemeral_infra::Result<ExitCode> {
    match command {
        Cmd::Prepare => {
            let started = Instant::now();
            let libs = ephemeral_infra::prepare_kafka()?;
            println!(
                "kafka {} jars: {} ({:.1} s)",
                ephemeral_infra::KAFKA_VERSION,
                libs.display(),
                started.elapsed().as_secs_f64()
            );
            let started = Instant::now();
            let kube = ephemeral_infra::prepare_kube()?;
            println!(
                "kubernetes {} binaries: {} ({:.1} s)",
                ephemeral_infra::KUBERNETES_VERSION,
                kube.dir.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::PrepareNode => {
            let started = Instant::now();
            let node = ephemeral_infra::prepare_node()?;
            println!(
                "kubernetes {} node binaries: {} ({:.1} s)",
                ephemeral_infra::KUBERNETES_VERSION,
                node.dir.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Image {
            contents,
            name,
            out,
        } => {
            let root = ephemeral_infra::workspace_root();
            let text = std::fs::read_to_string(root.join(contents))?;
            let contents = ephemeral_infra::image::Contents::parse(&text, &root)?;
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let image = ephemeral_infra::image::pack(&contents, &name, &out)?;
            println!(
                "{name}: {} ({}, {} files)",
                image.path.display(),
                image.digest,
                image.files.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::HostServices {
            address,
            trust,
            command,
        } => {
            let started = Instant::now();
            let pg = ephemeral_pg::EphemeralPostgres::start(&ephemeral_pg::Options {
                parent_dir: ephemeral_infra::tmp_dir(),
                also_listen: vec![address.clone()],
                also_trust: trust,
                ..Default::default()
            })
            .map_err(|e| ephemeral_infra::Error::Prepare {
                step: "PostgreSQL".into(),
                detail: e.to_string(),
            })?;
            let rabbitmq = ephemeral_infra::RabbitMq::start_also_on(Some(&address))?;
            eprintln!(
                "PostgreSQL on {address}:{} and RabbitMQ on {address}:{} ready in {:.1} s",
                pg.port(),
                rabbitmq.port(),
                started.elapsed().as_secs_f64()
            );
            let status = Command::new(&command[0])
                .args(&command[1..])
                .env("PG_PORT", pg.port().to_string())
                .env("AMQP_PORT", rabbitmq.port().to_string())
                .status()?;
            rabbitmq.stop();
            drop(pg);
            Ok(exit_code(status))
        }
        Cmd::KubeApi { command } => {
            let started = Instant::now();
            let api = ephemeral_infra::KubeApi::start()?;
            eprintln!(
                "kube-apiserver {} on {} ready in {:.1} s",
                ephemeral_infra::KUBERNETES_VERSION,
                api.url(),
                started.elapsed().as_secs_f64()
            );
            let status = Command::new(&command[0])
                .args(&command[1..])
                .env("KUBECONFIG", api.kubeconfig())
                .env("KUBECTL", api.kubectl_path())
                .status()?;
            drop(api);
            Ok(exit_code(status))
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
