# A minimal Rails application whose only job is Doorkeeper, the OAuth 2
# provider of Rails applications (Coupa is one): a real authorization server
# nobody on this project wrote, for the token-path tests (tests/real_oauth.rs).
#
# Usage: ruby app.rb DIR PORT ACCESS_TOKEN_SECONDS CC_SECRET USER_REDIRECT_URI
#
# It serves, on 127.0.0.1:PORT:
# - /oauth2/token, /oauth2/authorize, /oauth2/revoke: Doorkeeper itself, with
#   confidential client-credentials clients `cc-client` (secret CC_SECRET)
#   and `cc-plain` (PLAIN_SECRET below), and a public authorization-code client `user-client` (PKCE, rotating
#   refresh tokens: the old pair is revoked when it is refreshed);
# - /api/*: a protected resource, 401 for an invalid token, 403 without
#   the scope core.invoice.read, else JSON naming the path;
# - /moved/oauth2/token: a permanent redirect to /oauth2/token, as a server
#   answers a token URL that moved;
# - /test/stats and /test/expire: the test's view into the database (tokens
#   issued per grant) and its hand on it (end every access token early).
# The database is sqlite in DIR, made anew at each start.

DIR, PORT, LIFETIME, CC_SECRET, USER_REDIRECT = ARGV
abort "usage: ruby app.rb DIR PORT ACCESS_TOKEN_SECONDS CC_SECRET USER_REDIRECT_URI" unless USER_REDIRECT

# Rails reads the database from here when there is no config/database.yml.
ENV["DATABASE_URL"] = "sqlite3:#{File.join(DIR, "db.sqlite3")}"
require "logger"
require "rails"
require "active_record/railtie"
require "action_controller/railtie"
require "doorkeeper"
require "rack/handler/webrick"

class DoorkeeperApp < Rails::Application
  config.root = DIR
  config.eager_load = false
  config.logger = Logger.new(File.join(DIR, "rails.log"))
  config.log_level = :info
  config.secret_key_base = "0" * 64
  config.hosts.clear
  config.action_controller.allow_forgery_protection = false
end

# The one user of this server, always signed in.
ConsentingUser = Struct.new(:id)

Doorkeeper.configure do
  orm :active_record
  # The consent is given by "user 1"; the test plays the browser.
  resource_owner_authenticator { ConsentingUser.new(1) }
  grant_flows %w[authorization_code client_credentials]
  use_refresh_token
  access_token_expires_in LIFETIME.to_i
  default_scopes "core.invoice.read"
  optional_scopes "core.supplier.read", "offline_access"
  enforce_configured_scopes
  force_ssl_in_redirect_uri false
end

Rails.application.initialize!

# A secret of unreserved characters, which HTTP Basic carries the same
# whether or not the server decodes it.
PLAIN_SECRET = "plain-secret-Zx9_Qm-4.kT7"

ActiveRecord::Base.logger = nil
ActiveRecord::Schema.verbose = false
ActiveRecord::Schema.define do
  create_table :oauth_applications, force: true do |t|
    t.string :name, null: false
    t.string :uid, null: false
    t.string :secret, null: false
    t.text :redirect_uri, null: false
    t.string :scopes, null: false, default: ""
    t.boolean :confidential, null: false, default: true
    t.timestamps null: false
  end
  add_index :oauth_applications, :uid, unique: true
  create_table :oauth_access_grants, force: true do |t|
    t.references :resource_owner, null: false
    t.references :application, null: false
    t.string :token, null: false
    t.integer :expires_in, null: false
    t.text :redirect_uri, null: false
    t.datetime :created_at, null: false
    t.datetime :revoked_at
    t.string :scopes, null: false, default: ""
    t.string :code_challenge
    t.string :code_challenge_method
  end
  add_index :oauth_access_grants, :token, unique: true
  # No previous_refresh_token column: Doorkeeper then revokes a refreshed
  # pair (access and refresh token) the moment it issues the next one.
  create_table :oauth_access_tokens, force: true do |t|
    t.references :resource_owner, index: true
    t.references :application, null: false
    t.text :token, null: false
    t.string :refresh_token
    t.integer :expires_in
    t.datetime :revoked_at
    t.datetime :created_at, null: false
    t.string :scopes
  end
  add_index :oauth_access_tokens, :token, unique: true
  add_index :oauth_access_tokens, :refresh_token, unique: true
end


Doorkeeper::Application.create!(
  name: "client credentials", uid: "cc-client", secret: CC_SECRET,
  redirect_uri: "urn:ietf:wg:oauth:2.0:oob", scopes: "core.invoice.read core.supplier.read",
  confidential: true
)
Doorkeeper::Application.create!(
  name: "client credentials, plain secret", uid: "cc-plain", secret: PLAIN_SECRET,
  redirect_uri: "urn:ietf:wg:oauth:2.0:oob", scopes: "core.invoice.read",
  confidential: true
)
Doorkeeper::Application.create!(
  name: "user consent", uid: "user-client", secret: "unused-public",
  redirect_uri: USER_REDIRECT, scopes: "core.invoice.read offline_access",
  confidential: false
)

class ApiController < ActionController::API
  before_action { doorkeeper_authorize! :"core.invoice.read" }

  def show
    render json: { ok: true, path: request.path, token_id: doorkeeper_token.id }
  end
end

class TestController < ActionController::API
  def stats
    tokens = Doorkeeper::AccessToken.all.to_a
    render json: {
      client_credentials: tokens.count { |t| t.resource_owner_id.nil? },
      user: tokens.count { |t| !t.resource_owner_id.nil? },
      live: tokens.count { |t| t.revoked_at.nil? }
    }
  end

  # Doorkeeper keeps an access token and its refresh token in one row:
  # revoking the row would end both. Moving its issue time back by a day
  # ends the access token alone, as a server ends a token early while the
  # refresh token lives on (a refresh copies the lifetime, so that stays).
  def expire
    ended = Doorkeeper::AccessToken.where(revoked_at: nil).update_all(created_at: Time.now.utc - 86_400)
    render json: { ended: ended }
  end
end

Rails.application.routes.draw do
  use_doorkeeper scope: "oauth2"
  get "/moved/oauth2/token", to: redirect("/oauth2/token", status: 308)
  post "/moved/oauth2/token", to: redirect("/oauth2/token", status: 308)
  get "/test/stats", to: "test#stats"
  post "/test/expire", to: "test#expire"
  match "/api/*path", to: "api#show", via: :all
end

Rack::Handler::WEBrick.run(
  Rails.application,
  Host: "127.0.0.1", Port: PORT.to_i,
  Logger: WEBrick::Log.new(File.join(DIR, "webrick.log")),
  AccessLog: [[File.open(File.join(DIR, "access.log"), "a").tap { |f| f.sync = true }, WEBrick::AccessLog::COMBINED_LOG_FORMAT]]
)
