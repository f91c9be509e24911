// The listening socket of the floor server and the front end.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "aimass/error.h"
#include "serve/wire.h"

namespace aimass::serve::wire {

int listen_on(const std::string& host_in, int port, int backlog, const char* who, int& bound_port) {
  const std::string host = host_in == "localhost" ? "127.0.0.1" : host_in;
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST | AI_PASSIVE;
  int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  AIMASS_CHECK(rc == 0 && res, ValueError, who, ": host '", host_in, "' is not a numeric address");
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  if (fd >= 0) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  bool ok = fd >= 0 && ::bind(fd, res->ai_addr, res->ai_addrlen) == 0 && ::listen(fd, backlog) == 0;
  int err = errno;
  ::freeaddrinfo(res);
  if (!ok && fd >= 0) ::close(fd);
  AIMASS_CHECK(ok, IOError, who, ": cannot listen on ", host_in, ":", port, ": ", std::strerror(err));
  sockaddr_storage addr{};
  socklen_t alen = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &alen);
  bound_port = ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                                : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return fd;
}

}  // namespace aimass::serve::wire
