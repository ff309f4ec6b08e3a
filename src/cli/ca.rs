//! `ca init`: a new local CA for `[listen.intercept]`, and with `--host` a
//! certificate for the name-only recipe, with what to put where and how
//! each client family comes to trust the CA.

use std::path::Path;

use super::{config_failure, Failure};
use crate::intercept::ca::{self, CaError};

pub fn ca_init(dir: &Path, host: Option<&str>) -> Result<(), Failure> {
    let written = ca::init(dir, host).map_err(|error| match error {
        CaError::Exists { .. } | CaError::Mint(_) => config_failure(error),
        other => Failure::from(other),
    })?;
    let ca_cert = written.ca_cert.display();
    let ca_key = written.ca_key.display();
    println!("wrote {ca_cert} (the CA certificate: give it to the integration hosts)");
    println!("wrote {ca_key} (the CA key, mode 0600: keep it with the proxy's other secrets)");
    if let (Some((cert, key)), Some(host)) = (&written.leaf, host) {
        println!(
            "wrote {} and {} (a certificate for {host}, valid one year, and its key, mode 0600)",
            cert.display(),
            key.display()
        );
        println!(
            "\nIntegrations that only take an instance name: make {host} resolve to the proxy \
             (a hosts entry or internal DNS) and serve TLS with that certificate:\n\
             \n  [listen]\n  address = \"0.0.0.0:443\"\n  [listen.tls]\n  cert_file = \"{}\"\n  key_file = \"{}\"",
            cert.display(),
            key.display()
        );
    }
    println!(
        "\nIntegrations that can only set a proxy: point their HTTPS proxy at this proxy's \
         listener and add to the config:\n\
         \n  [listen.intercept]\n  ca_cert_file = \"{ca_cert}\"\n  ca_key_file = \"{ca_key}\"\n\
         \nThen make each integration host trust {ca_cert}:\n\
         \n  JVM:          keytool -importcert -noprompt -alias coupa-auth-proxy -file {ca_cert} \\\n\
         \x20               -keystore truststore.jks -storepass changeit\n\
         \x20               then run with -Djavax.net.ssl.trustStore=truststore.jks -Djavax.net.ssl.trustStorePassword=changeit\n\
         \x20               (or import into $JAVA_HOME/lib/security/cacerts)\n\
         \x20 Debian/Ubuntu: cp {ca_cert} /usr/local/share/ca-certificates/coupa-auth-proxy.crt && update-ca-certificates\n\
         \x20 RHEL/Fedora:   cp {ca_cert} /etc/pki/ca-trust/source/anchors/coupa-auth-proxy.pem && update-ca-trust\n\
         \x20 Windows:       certutil -addstore -f Root {ca_cert}   (or Import-Certificate -CertStoreLocation Cert:\\LocalMachine\\Root)\n\
         \x20 Python:        REQUESTS_CA_BUNDLE={ca_cert} (requests), SSL_CERT_FILE={ca_cert} (urllib, httpx)\n\
         \x20 curl:          --cacert {ca_cert}\n\
         \nA host that trusts this CA trusts whoever holds ca.key for any name: keep the key \
         as secret as the OAuth client secret, and trust the CA only on hosts whose \
         integrations go through this proxy."
    );
    Ok(())
}
