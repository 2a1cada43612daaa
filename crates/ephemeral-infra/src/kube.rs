//! A real Kubernetes API server, envtest-style: etcd and kube-apiserver on
//! loopback with generated certificates, a service-account signing key and
//! RBAC on, but no kubelet, scheduler or controllers. The binaries, and a
//! kubectl of the same version, are built from the Go module proxy by
//! `tools/kube` (pinned there) and cached under `target/infra`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cache::{build_once, infra_dir, run, workspace_root};
use crate::watchdog::{free_port, run_dir, with_retries, Watchdog};
use crate::Result;

/// The Kubernetes release; `tools/kube/go.mod` requires the same.
pub const KUBERNETES_VERSION: &str = "v1.33.13";

/// The built `etcd`, `kube-apiserver` and `kubectl`.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    /// Their directory.
    pub dir: PathBuf,
}

impl KubeBinaries {
    /// The path of one of them.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Builds etcd, kube-apiserver and kubectl into `target/infra` unless they
/// are there (several minutes on two cores, once per machine).
pub fn prepare_kube() -> Result<KubeBinaries> {
    let dir = infra_dir().join(format!("kube-{KUBERNETES_VERSION}"));
    build_once(&dir, |out| {
        for (name, package) in [
            ("etcd", "go.etcd.io/etcd/server/v3"),
            ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
            ("kubectl", "k8s.io/kubernetes/cmd/kubectl"),
        ] {
            go_build(out, name, package, "-s -w")?;
        }
        Ok(())
    })?;
    Ok(KubeBinaries { dir })
}

/// What a one-node cluster runs besides containerd, into `target/infra`
/// unless there: etcd, kube-apiserver, kubectl, kubelet,
/// kube-controller-manager, kube-scheduler and kube-proxy, all saying
/// their version (without it they say `v0.0.0-master`, and Helm refuses a
/// chart's `kubeVersion`). About 10-15 minutes on two cores, once.
pub fn prepare_node() -> Result<KubeBinaries> {
    let dir = infra_dir().join(format!("kube-node-{KUBERNETES_VERSION}"));
    let mut parts = KUBERNETES_VERSION.trim_start_matches('v').split('.');
    let (major, minor) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut ldflags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (key, value) in [
            ("gitVersion", KUBERNETES_VERSION),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ] {
            ldflags += &format!(" -X {package}.{key}={value}");
        }
    }
    build_once(&dir, |out| {
        go_build(out, "etcd", "go.etcd.io/etcd/server/v3", "-s -w")?;
        for name in [
            "kube-apiserver",
            "kubectl",
            "kubelet",
            "kube-controller-manager",
            "kube-scheduler",
            "kube-proxy",
        ] {
            go_build(
                out,
                name,
                &format!("k8s.io/kubernetes/cmd/{name}"),
                &ldflags,
            )?;
        }
        Ok(())
    })?;
    Ok(KubeBinaries { dir })
}

/// `go build` of `package` from `tools/kube` into `out/name`.
fn go_build(out: &Path, name: &str, package: &str, ldflags: &str) -> Result<()> {
    run(
        &format!("go build {package}"),
        Command::new("go")
            .current_dir(workspace_root().join("tools/kube"))
            .args(["build", "-buildvcs=false", "-trimpath"])
            .arg(format!("-ldflags={ldflags}"))
            .arg("-o")
            .arg(out.join(name))
            .arg(package),
    )
}

/// A running API server and its etcd. Dropping it kills both and deletes
/// their directory.
#[derive(Debug)]
pub struct KubeApi {
    port: u16,
    dir: PathBuf,
    binaries: KubeBinaries,
    // Declared first so it stops first: the API server before its etcd.
    apiserver: Watchdog,
    _etcd: Watchdog,
}

impl KubeApi {
    /// Starts etcd and the API server and waits for `/readyz` (about 10 s;
    /// the first call on a machine also builds the binaries).
    pub fn start() -> Result<Self> {
        let binaries = prepare_kube()?;
        with_retries(|| Self::try_start(&binaries))
    }

    fn try_start(binaries: &KubeBinaries) -> Result<Self> {
        let dir = run_dir("kube-api-")?;
        let pki = dir.join("pki");
        make_certificates(&pki)?;
        let (client, peer, port) = (free_port()?, free_port()?, free_port()?);

        let mut etcd = Command::new(binaries.path("etcd"));
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .arg("--unsafe-no-fsync");
        // etcd's watchdog owns the directory, so it is removed last.
        let mut etcd = Watchdog::spawn(&etcd, &dir.join("etcd.log"), Some(&dir), None)?;
        etcd.wait_until("etcd", Duration::from_secs(30), || {
            std::fs::read_to_string(dir.join("etcd.log"))
                .is_ok_and(|l| l.contains("serving client traffic insecurely"))
        })?;

        let file = |name: &str| pki.join(name).display().to_string();
        let mut apiserver = Command::new(binaries.path("kube-apiserver"));
        apiserver
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg(format!("--secure-port={port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!("--tls-cert-file={}", file("server.crt")))
            .arg(format!("--tls-private-key-file={}", file("server.key")))
            .arg(format!("--client-ca-file={}", file("ca.crt")))
            .arg(format!("--service-account-key-file={}", file("sa.key")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                file("sa.key")
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .args(["--authorization-mode=RBAC", "--allow-privileged=true"])
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--disable-admission-plugins=ServiceAccount");
        let apiserver = Watchdog::spawn(&apiserver, &dir.join("kube-apiserver.log"), None, None)?;
        std::fs::write(dir.join("kubeconfig"), kubeconfig(&pki, port))?;
        let mut api = Self {
            port,
            dir,
            binaries: binaries.clone(),
            apiserver,
            _etcd: etcd,
        };
        let mut probe = api.kubectl();
        probe.args(["get", "--raw=/readyz"]);
        api.apiserver
            .wait_until("kube-apiserver", Duration::from_secs(90), || {
                probe.output().is_ok_and(|o| o.status.success())
            })?;
        Ok(api)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// An admin (`system:masters`) kubeconfig for this server.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// kubectl of the server's version, pointed at it.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.binaries.path("kubectl"));
        c.env("KUBECONFIG", self.kubeconfig());
        c
    }

    /// Where kubectl is.
    pub fn kubectl_path(&self) -> PathBuf {
        self.binaries.path("kubectl")
    }

    /// The run directory (logs, certificates), deleted when it stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A CA, the API server's serving certificate for 127.0.0.1, an admin
/// client certificate in `system:masters`, and the service-account key.
fn make_certificates(pki: &Path) -> Result<()> {
    std::fs::create_dir_all(pki)?;
    let openssl = |step: &str, args: &[&str]| {
        run(
            &format!("openssl {step}"),
            Command::new("openssl").current_dir(pki).args(args),
        )
    };
    openssl(
        "CA",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=orders-center-envtest-ca",
        ],
    )?;
    for (name, subject, extension) in [
        (
            "server",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "admin",
            "/O=system:masters/CN=envtest-admin",
            "extendedKeyUsage=clientAuth\n",
        ),
    ] {
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(pki.join(&ext), extension)?;
        openssl(
            name,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                subject,
            ],
        )?;
        openssl(
            name,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ],
        )?;
    }
    openssl("service-account key", &["genrsa", "-out", "sa.key", "2048"])
}

fn kubeconfig(pki: &Path, port: u16) -> String {
    let file = |name: &str| pki.join(name).display().to_string();
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {crt}
    client-key: {key}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: admin
current-context: envtest
",
        ca = file("ca.crt"),
        crt = file("admin.crt"),
        key = file("admin.key"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_go_module_pins_the_version_the_helper_caches_under() {
        let go_mod = std::fs::read_to_string(workspace_root().join("tools/kube/go.mod")).unwrap();
        assert!(go_mod.contains(&format!("k8s.io/kubernetes {KUBERNETES_VERSION}")));
    }
}
